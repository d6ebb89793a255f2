"""Load benchmark: 64 concurrent streaming chat clients vs the same requests one at a time.

Starts `slimquant serve` on loopback with a W8A8_DYNAMIC-quantized random llama, then prints requests
completed / failed, p50 / p99 time to first token and aggregate tokens/s for both runs, and their ratio.

    .venv/bin/python bench/serve_load.py [--clients 64] [--max-tokens 32] [--timeout 300]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimquant import quantize  # noqa: E402
from slimquant.random_models import make_tiny_model  # noqa: E402

TOPICS = ["the sea", "a city at night", "mathematics", "a small dog", "autumn", "trains", "tea", "the moon"]


async def one_client(http: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float | None, int, bool]:
    """Stream one chat completion; returns (time to first token, tokens received, ok)."""
    body = {
        "messages": [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start, ttft, tokens = time.perf_counter(), None, 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return None, 0, False
            async for line in r.aiter_lines():
                if line.startswith("data: {") and ttft is None and '"content": "' in line:
                    ttft = time.perf_counter() - start
                if '"usage"' in line and '"completion_tokens"' in line:
                    tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
        return ttft, tokens, tokens == max_tokens
    except httpx.HTTPError:
        return None, 0, False


async def run_load(base: str, clients: int, max_tokens: int, concurrent: bool, timeout: float) -> dict:
    """All clients at once, or one after another; bounded by timeout."""
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        if concurrent:
            jobs = [one_client(http, i, max_tokens) for i in range(clients)]
            results = await asyncio.wait_for(asyncio.gather(*jobs), timeout)
        else:
            results = [await asyncio.wait_for(one_client(http, i, max_tokens), timeout) for i in range(clients)]
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _, ok in results if ok and t is not None)
    return {
        "ok": sum(ok for *_, ok in results),
        "failed": sum(not ok for *_, ok in results),
        "p50": statistics.median(ttfts) if ttfts else float("nan"),
        "p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan"),
        "tok_s": sum(n for _, n, _ in results) / wall,
        "wall": wall,
    }


def start_server(model: Path, port: int, *extra: str) -> subprocess.Popen:
    """`slimquant serve model` on loopback with 64 sequences of up to 512 tokens (plus extra options), healthy."""
    cmd = [
        sys.executable,
        "-m",
        "slimquant.entrypoints.cli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--quantization",
        "ascend",
        "--max-num-seqs",
        "64",
        "--max-model-len",
        "512",
        *extra,
    ]
    proc = subprocess.Popen(cmd)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on each run, seconds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = make_tiny_model(
            "llama",
            Path(tmp) / "float",
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        dst = Path(tmp) / "w8a8_dynamic"
        quantize(src, dst, quant_type="w8a8_dynamic", progress=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(dst, port)
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(run_load(base, 2, 4, concurrent=True, timeout=args.timeout))  # warm-up
            seq = asyncio.run(run_load(base, args.clients, args.max_tokens, False, args.timeout))
            par = asyncio.run(run_load(base, args.clients, args.max_tokens, True, args.timeout))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{args.clients} streaming chat requests x {args.max_tokens} tokens, W8A8_DYNAMIC random llama (h=256, 4L)")
    print(f"{'run':<14}{'completed':>10}{'failed':>8}{'p50 TTFT s':>12}{'p99 TTFT s':>12}{'tokens/s':>10}{'wall s':>8}")
    for name, r in (("one at a time", seq), (f"{args.clients} at once", par)):
        print(
            f"{name:<14}{r['ok']:>10}{r['failed']:>8}{r['p50']:>12.3f}{r['p99']:>12.3f}{r['tok_s']:>10.1f}"
            f"{r['wall']:>8.1f}"
        )
    print(f"throughput ratio (concurrent / one at a time): {par['tok_s'] / seq['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
