"""Tensor parallel on one machine: 1 process vs N ranks, side by side in one run.

A random checkpoint of Qwen2.5-0.5B's shape (14 heads, 2 kv heads: splits in 2) in --scheme (cached), on the
torch-reference and cpu-native backends (cpu-native runs its whole-step native stack for decode steps, its ranks
reducing from inside it). Rows "torchrun" start their ranks as torchrun would (slimquant.distributed.launch.run_ranks:
every rank its own engine, each on cores / N threads); rows "engine" are LLM(tensor_parallel_size=N) in this
process, which drives the ranks it starts (rank 0 measured). Both exchange small tensors through shared memory
(since the commit after d250917; the torchrun rows went through gloo before). It measures on every rank: checkpoint
bytes read, peak RSS, prefill tokens/s of a --prompt-tokens prompt, single-stream greedy decode tokens/s of
--decode-tokens tokens (medians over --rounds, the range beside them), and for N > 1 the latency of one int32
all-reduce of a decode step's size and of the prompt's, over gloo and through shared memory (what each row-parallel
layer pays, twice for W8A8_DYNAMIC: the absmax and the int32 sum).

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

from bench.speed import QWEN25_05B_SHAPE, random_checkpoint  # noqa: E402
from slimquant.distributed.launch import run_ranks  # noqa: E402


def measure(rank: int, size: int, path: str, backend: str, args: argparse.Namespace, probe: bool = True) -> dict:
    """One rank: load, then time prefill and decode; its bytes read, peak RSS and (probe) all-reduce latencies."""
    from slimquant import LLM, SamplingParams

    llm = LLM(
        path, tensor_parallel_size=size, kernels={"backend": backend}, max_model_len=2048, enable_prefix_caching=False
    )  # no prefix cache: each round prefills the whole prompt
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
    latency = all_reduce_latency(rank, size, args.prompt_tokens) if size > 1 and probe else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    engine.shutdown()
    return dict(bytes=engine.bytes_read, rss=rss, prefill=prefill, decode=decode, latency=latency)


def all_reduce_latency(rank: int, size: int, prompt_tokens: int) -> dict[tuple[str, int], float]:
    """Seconds per int32 all-reduce of one token's hidden state (a decode step's) and of prompt_tokens' (the
    prompt's prefill), over gloo and through shared memory: {(way, tokens): seconds}."""
    import torch

    from slimquant.distributed.tensor_parallel import TensorParallel
    from slimquant.distributed.workers import _share_memory

    out = {}
    for name, offer in (("gloo", False), ("shm", True)):
        tp = _share_memory(TensorParallel(rank, size), offer)
        for tokens, calls in ((1, 200), (prompt_tokens, 20)):
            x = torch.zeros(tokens, QWEN25_05B_SHAPE["hidden_size"], dtype=torch.int32)
            for _ in range(calls // 10):
                tp.sum(x)
            start = time.perf_counter()
            for _ in range(calls):
                tp.sum(x)
            out[name, tokens] = (time.perf_counter() - start) / calls
        tp.barrier()
        if tp.local is not None:
            tp.local.close(unlink=rank == 0)
    return out


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
    path = str(random_checkpoint("qwen2", "qwen2.5-0.5b", QWEN25_05B_SHAPE, args.scheme))
    cores = os.cpu_count() or 1
    rows = []
    for backend in ("torch-reference", "cpu-native"):
        for size in args.sizes:
            ranks = run_ranks(measure, size, path, backend, args, threads=max(1, cores // size), timeout=1800)
            rows.append((size, backend, "torchrun", ranks))
        for size in [n for n in args.sizes if n > 1]:  # the engine starts the ranks: rank 0 drives, shared memory
            rows.append((size, backend, "engine", [measure(0, size, path, backend, args, probe=False)]))
    layers = QWEN25_05B_SHAPE["num_hidden_layers"]
    per_step = layers * 2 * (2 if args.scheme == "w8a8_dynamic" else 1)
    print(f"\n{Path(path).name}: prompt {args.prompt_tokens} tokens, decode {args.decode_tokens}, {cores} cores")
    print(f"{'ranks':>5} {'backend':<16}{'started by':<11}{'rank':>5}{'read MB':>9}{'peak RSS MiB':>13}"
          f"{'prefill tok/s [range]':>26}{'decode tok/s [range]':>26}{'gloo us':>9}{'shm us':>8}"
          f"{'prompt gloo ms':>16}{'shm ms':>8}")  # fmt: skip
    for size, backend, launch, ranks in rows:
        for rank, r in enumerate(ranks):
            lat = f"{'-':>17}{'-':>24}"
            if r["latency"]:
                us = [r["latency"][way, 1] * 1e6 for way in ("gloo", "shm")]
                ms = [r["latency"][way, args.prompt_tokens] * 1e3 for way in ("gloo", "shm")]
                lat = f"{us[0]:9.0f}{us[1]:8.0f}{ms[0]:16.2f}{ms[1]:8.2f}"
            launched = launch if size > 1 else "-"
            print(f"{size:>5} {backend:<16}{launched:<11}{rank:>5}{r['bytes'] / 1e6:9.1f}{r['rss']:13.0f}"
                  f"{spread(r['prefill']):>26}{spread(r['decode']):>26}{lat}")  # fmt: skip
    for size, backend, _, ranks in rows:
        if ranks[0]["latency"] and backend == "torch-reference":
            step = 1 / statistics.median(ranks[0]["decode"])
            prefill = args.prompt_tokens / statistics.median(ranks[0]["prefill"])
            for (name, tokens), latency in ranks[0]["latency"].items():
                # a prefill's W8A8_DYNAMIC absmax reductions carry a float per token: only its sums are long
                what, took, n = ("decode step", step, per_step) if tokens == 1 else (
                    f"{tokens}-token prefill", prefill, layers * 2)  # fmt: skip
                print(
                    f"tp={size}: {n} all-reduces per {what} x {latency * 1e6:.0f} us ({name}) = "
                    f"{n * latency * 1e3:.1f} ms, against a {took * 1e3:.1f} ms {what} of the torchrun "
                    "rows (torch-reference, shared memory)"
                )


if __name__ == "__main__":
    main()
