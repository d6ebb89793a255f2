"""Tensor parallel on one machine: 1 process vs N ranks, side by side in one run.

A random model of Qwen2.5-0.5B's shape (14 heads, 2 kv heads: splits in 2), quantized to --scheme (cached). Each
row starts its ranks as torchrun would (slimquant.distributed.launch.run_ranks: every rank its own engine, each on
cores / N threads) and measures on every rank: checkpoint bytes read, peak RSS, prefill tokens/s of a
--prompt-tokens prompt, single-stream greedy decode tokens/s of --decode-tokens tokens (medians over --rounds, the
range beside them), and for N > 1 the latency of one gloo all-reduce of a decode step's size (what each
row-parallel layer pays, twice for W8A8_DYNAMIC: the absmax and the int32 sum). The 1-process rows run on the
torch-reference backend (what the ranks run) and on cpu-native (today's fastest single process).

    .venv/bin/python bench/parallel.py [--sizes 1 2] [--scheme w8a8_dynamic] [--rounds 3]
        [--prompt-tokens 256] [--decode-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import QWEN25_05B_SHAPE, quantized, random_model  # noqa: E402
from slimquant.distributed.launch import run_ranks  # noqa: E402


def measure(rank: int, size: int, path: str, backend: str, args: argparse.Namespace) -> dict:
    """One rank: load, then time prefill and decode; its bytes read, peak RSS and all-reduce latency."""
    import torch
    import torch.distributed as dist

    from slimquant import LLM, SamplingParams

    llm = LLM(path, tensor_parallel_size=size, kernels={"backend": backend}, max_model_len=1024)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": [(7 * i) % 5000 + 100 for i in range(args.prompt_tokens)]}
    prefill, decode = [], []
    long = SamplingParams(max_tokens=args.decode_tokens + 1, temperature=0, ignore_eos=True)
    llm.generate([prompt], long, use_tqdm=False)  # warm-up: first-call costs (kernel plans, allocations)
    for _ in range(args.rounds):
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        prefill.append(args.prompt_tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        llm.generate([prompt], long, use_tqdm=False)
        decode.append(args.decode_tokens / (time.perf_counter() - start - args.prompt_tokens / prefill[-1]))
    latency = None
    if size > 1:
        x = torch.zeros(1, QWEN25_05B_SHAPE["hidden_size"], dtype=torch.int32)
        for _ in range(20):
            dist.all_reduce(x)
        start = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(x)
        latency = (time.perf_counter() - start) / 200
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    return dict(bytes=engine.bytes_read, rss=rss, prefill=prefill, decode=decode, latency=latency)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes to compare")
    ap.add_argument("--scheme", default="w8a8_dynamic")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args()
    path = str(quantized(random_model("qwen2", "qwen2.5-0.5b", QWEN25_05B_SHAPE), args.scheme))
    cores = os.cpu_count() or 1
    runs = [(1, "cpu-native")] + [(n, "torch-reference") for n in args.sizes]
    rows = []
    for size, backend in runs:
        ranks = run_ranks(measure, size, path, backend, args, threads=max(1, cores // size), timeout=1800)
        rows.append((size, backend, ranks))
    layers = QWEN25_05B_SHAPE["num_hidden_layers"]
    per_step = layers * 2 * (2 if args.scheme == "w8a8_dynamic" else 1)
    print(f"\n{Path(path).name}: prompt {args.prompt_tokens} tokens, decode {args.decode_tokens}, {cores} cores")
    print(f"{'ranks':>5} {'backend':<16}{'rank':>5}{'read MB':>9}{'peak RSS MiB':>13}"
          f"{'prefill tok/s [range]':>26}{'decode tok/s [range]':>26}{'all-reduce us':>15}")  # fmt: skip
    for size, backend, ranks in rows:
        for rank, r in enumerate(ranks):
            lat = f"{r['latency'] * 1e6:15.0f}" if r["latency"] else f"{'-':>15}"
            print(f"{size:>5} {backend:<16}{rank:>5}{r['bytes'] / 1e6:9.1f}{r['rss']:13.0f}"
                  f"{spread(r['prefill']):>26}{spread(r['decode']):>26}{lat}")  # fmt: skip
    for size, _, ranks in rows:
        if ranks[0]["latency"]:
            step = 1 / statistics.median(ranks[0]["decode"])
            comm = per_step * ranks[0]["latency"]
            print(f"tp={size}: {per_step} all-reduces per decode step x {ranks[0]['latency'] * 1e6:.0f} us = "
                  f"{comm * 1e3:.1f} ms of a {step * 1e3:.1f} ms step ({comm / step:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
