"""Tensor parallel on one machine: 1 process vs N ranks, side by side in one run.

A random checkpoint of Qwen2.5-0.5B's shape (14 heads, 2 kv heads: splits in 2) in --scheme (cached), on the
torch-reference and cpu-native backends (cpu-native runs its whole-step native stack for decode steps, its ranks
reducing from inside it). Rows "torchrun" start their ranks as torchrun would (slimquant.distributed.launch.run_ranks:
every rank its own engine, each on cores / N threads); rows "engine" are LLM(tensor_parallel_size=N) in a fresh
process, which drives the ranks it starts (rank 0 measured). Both exchange small tensors through shared memory.
It measures on every rank: checkpoint bytes read, peak RSS (the process's own, VmHWM; a 256 MiB KV cache per
rank), prefill tokens/s of a --prompt-tokens prompt, single-stream greedy decode tokens/s of --decode-tokens tokens
(medians over --rounds, the range beside them), and for N > 1 the latency of one int32 all-reduce of a decode
step's size and of the prompt's, over gloo and through shared memory (what each row-parallel layer pays, twice for
W8A8_DYNAMIC: the absmax and the int32 sum).

With --deepseek the model is a MoE one instead: bench/moe_cpu.py's DeepSeek-V2-Lite-shaped checkpoint (MLA, 16
routed experts of 2048 -> 1408, 6 per token, random weights; 3 layers) in --scheme, and every N > 1 comes twice:
each expert's matrices split over the ranks (tensor parallel) and whole experts per rank (--enable-expert-parallel).

    .venv/bin/python bench/parallel.py [--sizes 1 2] [--scheme w8a8_dynamic] [--rounds 3]
        [--prompt-tokens 256] [--decode-tokens 32] [--deepseek]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefill_attention import deepseek_model  # noqa: E402
from bench.speed import QWEN25_05B_SHAPE, quantized, random_checkpoint  # noqa: E402
from slimquant.distributed.launch import run_ranks  # noqa: E402
from slimquant.quant.memory import peak_rss_bytes  # noqa: E402

KV_CACHE_BYTES = 256 << 20  # per rank, as every row's (the default, up to 2 GiB, would be most of a rank's memory)


def measure(
    rank: int, size: int, path: str, backend: str, args: argparse.Namespace, probe: bool = True, ep: bool = False
) -> dict:
    """One rank: load, then time prefill and decode; its bytes read, peak RSS and (probe) all-reduce latencies.
    ep: a MoE model's experts whole per rank (expert parallel), else split."""
    from slimquant import LLM, SamplingParams

    llm = LLM(
        path,
        tensor_parallel_size=size,
        enable_expert_parallel=ep,
        kernels={"backend": backend},
        max_model_len=2048,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enable_prefix_caching=False,  # each round prefills the whole prompt
    )
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
    if size > 1 and probe:
        hidden = json.loads((Path(path) / "config.json").read_text())["hidden_size"]
        latency = all_reduce_latency(rank, size, args.prompt_tokens, hidden)
    rss = peak_rss_bytes() / 2**20  # MiB: this process's own peak (an engine row runs in a fresh one)
    engine.shutdown()
    return dict(bytes=engine.bytes_read, rss=rss, prefill=prefill, decode=decode, latency=latency)


def all_reduce_latency(rank: int, size: int, prompt_tokens: int, hidden: int) -> dict[tuple[str, int], float]:
    """Seconds per int32 all-reduce of one token's hidden state [1, hidden] (a decode step's) and of prompt_tokens'
    (the prompt's prefill), over gloo and through shared memory: {(way, tokens): seconds}."""
    import torch

    from slimquant.distributed.tensor_parallel import TensorParallel
    from slimquant.distributed.workers import _share_memory

    out = {}
    for name, offer in (("gloo", False), ("shm", True)):
        tp = _share_memory(TensorParallel(rank, size), offer)
        for tokens, calls in ((1, 200), (prompt_tokens, 20)):
            x = torch.zeros(tokens, hidden, dtype=torch.int32)
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


def in_fresh_process(fn: Callable, *args, timeout: float = 1800) -> object:
    """fn(*args) in a new process (its peak memory its own), which may start processes of its own; RuntimeError
    where it dies or gives no result within timeout seconds (then it is killed)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_put_result, args=(results, fn, args))
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            alive = proc.is_alive()  # before the wait: a result put just before it exited is still read
            try:
                return results.get(timeout=1)
            except queue.Empty:
                if not alive:
                    raise RuntimeError(f"{fn.__name__} died in its process (exit code {proc.exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__name__} gave no result in {timeout:.0f} s") from None
    finally:
        if proc.is_alive():
            proc.kill()  # the ranks an engine row started exit when their rank 0 is gone
        proc.join()


def _put_result(results, fn: Callable, args: tuple) -> None:
    results.put(fn(*args))


def model_path(args: argparse.Namespace) -> str:
    """The --scheme checkpoint of the bench's model (built once into the cache)."""
    if args.deepseek:
        return str(quantized(deepseek_model(), args.scheme))
    return str(random_checkpoint("qwen2", "qwen2.5-0.5b", QWEN25_05B_SHAPE, args.scheme))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes to compare")
    ap.add_argument("--scheme", default="w8a8_dynamic")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--deepseek", action="store_true", help="a DeepSeek-V2-Lite-shaped MoE model, with and without "
                    "expert parallel")  # fmt: skip
    args = ap.parse_args()
    path = model_path(args)
    cores = os.cpu_count() or 1
    ep_choices = (False, True) if args.deepseek else (False,)  # expert parallel off / on, for N > 1
    rows = []
    for backend in ("torch-reference", "cpu-native"):
        for size in args.sizes:
            for ep in ep_choices if size > 1 else (False,):
                ranks = run_ranks(measure, size, path, backend, args, True, ep, threads=max(1, cores // size),
                                  timeout=1800)  # fmt: skip
                rows.append((size, backend, "torchrun", ep, ranks))
        for size in [n for n in args.sizes if n > 1]:  # the engine starts the ranks: rank 0 drives, shared memory
            for ep in ep_choices:
                rank0 = in_fresh_process(measure, 0, size, path, backend, args, False, ep)
                rows.append((size, backend, "engine", ep, [rank0]))
    print(f"\n{Path(path).name}: prompt {args.prompt_tokens} tokens, decode {args.decode_tokens}, {cores} cores")
    print_rows(rows, args)
    if not args.deepseek:
        print_reduction_share(rows, args)


def print_rows(rows: list, args: argparse.Namespace) -> None:
    """The table: a line per rank of each row."""
    experts = f"{'experts':<8}" if args.deepseek else ""
    print(f"{'ranks':>5} {'backend':<16}{'started by':<11}{experts}{'rank':>5}{'read MB':>9}{'peak RSS MiB':>13}"
          f"{'prefill tok/s [range]':>26}{'decode tok/s [range]':>26}{'gloo us':>9}{'shm us':>8}"
          f"{'prompt gloo ms':>16}{'shm ms':>8}")  # fmt: skip
    for size, backend, launch, ep, ranks in rows:
        for rank, r in enumerate(ranks):
            lat = f"{'-':>17}{'-':>24}"
            if r["latency"]:
                us = [r["latency"][way, 1] * 1e6 for way in ("gloo", "shm")]
                ms = [r["latency"][way, args.prompt_tokens] * 1e3 for way in ("gloo", "shm")]
                lat = f"{us[0]:9.0f}{us[1]:8.0f}{ms[0]:16.2f}{ms[1]:8.2f}"
            launched = launch if size > 1 else "-"
            split = f"{('whole' if ep else 'split') if size > 1 else '-':<8}" if args.deepseek else ""
            print(f"{size:>5} {backend:<16}{launched:<11}{split}{rank:>5}{r['bytes'] / 1e6:9.1f}{r['rss']:13.0f}"
                  f"{spread(r['prefill']):>26}{spread(r['decode']):>26}{lat}")  # fmt: skip


def print_reduction_share(rows: list, args: argparse.Namespace) -> None:
    """What the all-reduces of a step cost over gloo and shared memory against the torchrun rows' step (Qwen)."""
    layers = QWEN25_05B_SHAPE["num_hidden_layers"]
    per_step = layers * 2 * (2 if args.scheme == "w8a8_dynamic" else 1)
    for size, backend, _, _, ranks in rows:
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
