"""Soak test: many streaming clients for minutes, with random disconnects, malformed and oversize requests and slow
senders mixed in, against one `slimquant serve` (--api-key set).

Each client loops until the deadline, and each turn is one of:
- a well-formed streaming chat or completion request (most turns): it must end with every token it asked for;
- a disconnect: the same request, dropped after a few chunks (the server must abort it and free its cache);
- a malformed request (a bad field, a bad token id, bytes that are not JSON): it must get a 400;
- an oversize body (past --max-request-bytes): it must get a 413;
- a slow sender: a request line and headers sent a byte at a time, then dropped.
Prints the first and the last minute side by side (requests, failures, p50 / p99 time to first token, the server's
RSS), the totals, and whether anything was left running or holding KV-cache blocks at the end.

    .venv/bin/python bench/soak.py [--model SmolLM2-135M-Instruct] [--clients 64] [--minutes 10]
        [--max-tokens 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_load import TOPICS, start_server  # noqa: E402
from bench.speed import add_model_args, int8_model  # noqa: E402

API_KEY = "soak"
MAX_REQUEST_BYTES = 1 << 20
# (turn kind, weight)
TURNS = (("ok", 80), ("disconnect", 8), ("malformed", 7), ("oversize", 3), ("slow", 2))
MALFORMED = (
    {"prompt": "x", "logit_bias": {"99999999": 5}},
    {"prompt": "x", "logit_bias": {"abc": 5}},
    {"prompt": [999999999]},
    {"prompt": [-5, 3]},
    {"prompt": ""},
    {"prompt": []},
    {"prompt": "x", "seed": 2**80},
    {"prompt": "x", "temperature": -1},
    {"messages": []},
)


@dataclass
class Tally:
    """What the clients saw, by turn kind and by minute."""

    start: float
    ttft: dict[int, list[float]] = field(default_factory=dict)  # minute -> TTFTs of well-formed requests
    done: dict[int, int] = field(default_factory=dict)  # minute -> well-formed requests completed
    failed: list[str] = field(default_factory=list)  # why each failed well-formed request failed
    counts: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)  # hostile turns that got an unexpected answer

    def minute(self) -> int:
        return int((time.perf_counter() - self.start) // 60)

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def request(rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    """A well-formed streaming chat or completion request that must produce exactly max_tokens tokens."""
    topic = rng.choice(TOPICS)
    body = {"max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0.8}
    body |= {"seed": rng.randrange(1 << 30), "stream_options": {"include_usage": True}}
    if rng.random() < 0.5:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": f"Write about {topic}."}]}
    return "/v1/completions", body | {"prompt": f"A few words about {topic}:"}


async def well_formed(http: httpx.AsyncClient, rng: random.Random, tally: Tally, max_tokens: int, drop: bool) -> None:
    """One streamed request; when drop, close the connection after a few chunks."""
    path, body = request(rng, max_tokens)
    minute, start, ttft, usage, chunks = tally.minute(), time.perf_counter(), None, None, 0
    keep = rng.randint(1, 4)
    try:
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                tally.failed.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                chunks += 1
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - start
                usage = chunk.get("usage") or usage
                if "error" in chunk:
                    tally.failed.append(f"error event: {chunk['error']}")
                    return
                if drop and chunks >= keep:
                    return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as e:
        tally.failed.append(f"{type(e).__name__}: {e}")
        return
    if drop:
        return
    if not usage or usage["completion_tokens"] != max_tokens:
        tally.failed.append(f"stream ended with usage {usage}, asked for {max_tokens} tokens")
        return
    tally.done[minute] = tally.done.get(minute, 0) + 1
    tally.ttft.setdefault(minute, []).append(ttft)


async def hostile(http: httpx.AsyncClient, rng: random.Random, tally: Tally, kind: str) -> None:
    """A malformed or oversize request; records any answer but the expected 400 / 413."""
    if kind == "malformed":
        body = rng.choice(MALFORMED)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        content, want = json.dumps(body).encode() if rng.random() < 0.8 else b'{"prompt": ', 400
    else:
        path, content, want = "/v1/completions", b'{"prompt": "' + b"a" * (MAX_REQUEST_BYTES + 1024) + b'"}', 413
    try:
        r = await http.post(path, content=content, headers={"Content-Type": "application/json"})
        if r.status_code != want:
            tally.wrong.append(f"{kind}: {r.status_code} {r.text[:200]}")
    except httpx.HTTPError as e:
        tally.wrong.append(f"{kind}: {type(e).__name__}: {e}")


async def slow_sender(host: str, port: int, rng: random.Random) -> None:
    """Open a connection, trickle a request's first bytes, then drop it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"[: rng.randint(5, 60)]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
    finally:
        writer.close()


async def client(base: str, port: int, i: int, tally: Tally, deadline: float, max_tokens: int, seed: int) -> None:
    """One client's turns until the deadline."""
    rng = random.Random(seed * 1000 + i)
    kinds, weights = zip(*TURNS, strict=True)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base, timeout=300, headers=headers) as http:
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            tally.count(kind)
            if kind in ("ok", "disconnect"):
                await well_formed(http, rng, tally, rng.randint(8, max_tokens), drop=kind == "disconnect")
            elif kind == "slow":
                await slow_sender("127.0.0.1", port, rng)
            else:
                await hostile(http, rng, tally, kind)


async def sample_rss(proc: psutil.Process, rss: dict[int, float], tally: Tally, deadline: float) -> None:
    """The server's RSS (MiB) at the end of each minute (the largest sample of the minute)."""
    while time.perf_counter() < deadline:
        minute = tally.minute()
        rss[minute] = max(rss.get(minute, 0.0), proc.memory_info().rss / 2**20)
        await asyncio.sleep(5)


def gauges(base: str) -> dict[str, float]:
    """The server's gauges from /metrics (requests running and waiting, KV-cache use)."""
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        name = name.partition("{")[0]  # vLLM's names, with their model_name label
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            out[name.removeprefix("vllm:")] = float(value)
    return out


async def soak(base: str, port: int, server: psutil.Process, args: argparse.Namespace) -> tuple[Tally, dict]:
    tally = Tally(start=time.perf_counter())
    deadline = tally.start + args.minutes * 60
    rss: dict[int, float] = {}
    jobs = [client(base, port, i, tally, deadline, args.max_tokens, args.seed) for i in range(args.clients)]
    await asyncio.gather(sample_rss(server, rss, tally, deadline), *jobs)
    return tally, rss


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(tally: Tally, rss: dict[int, float], idle: dict, args: argparse.Namespace, model: Path) -> None:
    print(f"\nsoak: {args.clients} clients x {args.minutes} min, {model.name}, up to {args.max_tokens} tokens each")
    print(f"{'minute':<10}{'completed':>10}{'p50 TTFT s':>12}{'p99 TTFT s':>12}{'server RSS MiB':>16}")
    last = max(rss)
    for label, m in (("first", 0), ("last", last)):
        t = tally.ttft.get(m, [])
        row = f"{label + f' ({m})':<10}{tally.done.get(m, 0):>10}{pct(t, 0.5):>12.3f}{pct(t, 0.99):>12.3f}"
        print(f"{row}{rss[m]:>16.1f}")
    everything = [x for t in tally.ttft.values() for x in t]
    print(f"{'all':<10}{sum(tally.done.values()):>10}{pct(everything, .5):>12.3f}{pct(everything, .99):>12.3f}"
          f"{max(rss.values()):>16.1f}  (max)")  # fmt: skip
    print(f"turns: {tally.counts}")
    print(f"failed well-formed requests: {len(tally.failed)}; hostile requests answered wrongly: {len(tally.wrong)}")
    for why in (tally.failed + tally.wrong)[:10]:
        print(f"  {why}")
    print(f"after the run: {idle}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=32, help="each well-formed request asks for 8 to this many")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = int8_model(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(model, port, "--api-key", API_KEY, "--max-request-bytes", str(MAX_REQUEST_BYTES))
    base = f"http://127.0.0.1:{port}"
    try:
        tally, rss = asyncio.run(soak(base, port, psutil.Process(proc.pid), args))
        time.sleep(2)  # the last aborts land
        idle = gauges(base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(tally, rss, idle, args, model)


if __name__ == "__main__":
    main()
