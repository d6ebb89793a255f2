"""DeepSeek's absorbed MLA decode on the CPU: the native kernels (NativeOps.mla_decode: one call over the paged latent
cache, each cached row read once for all heads; NativeOps.head_matmul: kv_b_proj's halves multiplied in place, in
bf16) against TorchOps' (each sequence's latents gathered into an fp32 copy, then a stride-0 bmm per head; kv_b_proj
converted to fp32 at every step, then einsum), side by side in one run.

- The ops alone: B sequences of one query token over C cached tokens each (a bf16 latent cache of 512 + 64 per
  token, 16-token blocks in random order; 16 query heads as DeepSeek-V2-Lite, 128 as DeepSeek-V3, Kimi-K2 has 64):
  the median ms of each over --rounds calls, alternating, and the ratio per round (median [min-max]); then the
  step's two products by kv_b_proj's halves (bf16, 128 + 128 rows of 512 per head).
- A DeepSeek-V2-Lite-shaped model (bench/prefill_attention.py --deepseek's, random weights, --scheme): greedy
  decode tokens/s of --streams streams after a prompt of each context length (the prefill untimed: from the
  requests' first token to their last), TorchOps' two ops patched in and the native ones alternating on one LLM for
  --rounds rounds after a warm-up, and the share of tokens on which they agree (the two sum in other orders;
  random weights make near-ties common).

    .venv/bin/python bench/mla_decode.py [--contexts 1024,4000] [--heads 16,128] [--batches 1,4] [--streams 1,4]
        [--scheme w8a8_dynamic] [--rounds 5]

Run it on a quiet machine: with 2 OpenMP threads, any other busy process stalls every parallel op.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._options import comma_ints  # noqa: E402
from bench.prefill_attention import deepseek_model  # noqa: E402
from bench.speed import quantized  # noqa: E402
from slimquant import LLM, SamplingParams  # noqa: E402
from slimquant.backends.native_ops import NativeOps  # noqa: E402
from slimquant.backends.torch_ops import TorchOps  # noqa: E402
from slimquant.kernels import native  # noqa: E402
from slimquant.layers.context import ForwardContext  # noqa: E402

RANK, ROPE, BLOCK = 512, 64, 16  # DeepSeek's kv_lora_rank and qk_rope_head_dim; slimquant's block size
NOPE = 128  # qk_nope_head_dim = v_head_dim
PATCHED = ("mla_decode", "head_matmul")  # NativeOps' methods that the model table's baseline takes from TorchOps


def spread(values: list[float], digits: int = 2) -> str:
    """'median [min-max]'."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def alternate_ms(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """ms of each named step per round, alternating, after one warm-up call of each."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def torch_and_native(native_ops: NativeOps, step: Callable[[TorchOps], object]) -> dict[str, Callable[[], object]]:
    """alternate_ms's steps: step(ops) with TorchOps ("torch") and with the native ops ("native")."""
    torch_ops = TorchOps()
    return {"torch": lambda: step(torch_ops), "native": lambda: step(native_ops)}


def ms_cells(times: dict[str, list[float]]) -> str:
    """'baseline ms | new ms | baseline / new per round' cells of a table row (times: baseline first)."""
    before, after = times.values()
    ratios = [a / b for a, b in zip(before, after, strict=True)]
    return f"{spread(before)} | {spread(after)} | {spread(ratios)}"


def op_times(native_ops: NativeOps, heads: int, batch: int, context: int, rounds: int) -> dict[str, list[float]]:
    """ms per mla_decode call of each ops."""
    blocks = -(-context // BLOCK)
    cache = torch.randn(batch * blocks, BLOCK, RANK + ROPE).bfloat16()  # [NB, BS, R + P]
    tables = torch.randperm(batch * blocks, dtype=torch.int32).view(batch, blocks)  # [B, W]
    ctx = ForwardContext([1] * batch, [context] * batch, torch.full((batch,), -1), tables, BLOCK)
    q = torch.randn(batch, heads, RANK + ROPE)  # [B, NH, R + P]
    return alternate_ms(torch_and_native(native_ops, lambda o: o.mla_decode(q, cache, ctx, RANK**-0.5, RANK)), rounds)


def absorb_times(native_ops: NativeOps, heads: int, batch: int, rounds: int) -> dict[str, list[float]]:
    """ms per step of both products by kv_b_proj's halves ([NH, 128 + 128, 512] bf16)."""
    w = torch.randn(heads, 2 * NOPE, RANK).bfloat16()  # [NH, nope + V, R]: the view of kv_b_proj's weight
    w_uk, w_uv = w.split([NOPE, NOPE], dim=1)
    q_nope, latents = torch.randn(batch, heads, NOPE), torch.randn(batch, heads, RANK)

    def step(o: TorchOps) -> None:
        o.head_matmul(q_nope, w_uk)
        o.head_matmul(latents, w_uv, transposed=True)

    return alternate_ms(torch_and_native(native_ops, step), rounds)


@contextlib.contextmanager
def torch_methods(ops: NativeOps, names: tuple[str, ...]) -> Iterator[None]:
    """Within: ops' methods named in names are TorchOps' (a baseline's ops on the same model)."""
    for name in names:
        setattr(ops, name, functools.partial(getattr(TorchOps, name), ops))
    try:
        yield
    finally:
        for name in names:
            vars(ops).pop(name, None)


def decode_rates(
    path: Path,
    contexts: list[int],
    streams: list[int],
    rounds: int,
    patched: tuple[str, ...] = PATCHED,
    baseline: Callable[[LLM], contextlib.AbstractContextManager] | None = None,
    llm_kwargs: dict | None = None,
) -> list[tuple]:
    """(context, streams, torch tokens/s per round, native tokens/s per round, tokens agreeing) on one LLM (made
    with llm_kwargs too); the "torch" rounds take the NativeOps methods named in patched from TorchOps (or run
    within baseline(llm))."""
    sizes = dict(max_model_len=max(contexts) + 64, max_num_batched_tokens=4096, enable_prefix_caching=False)
    llm = LLM(str(path), **sizes, **(llm_kwargs or {}))
    ops = llm.llm_engine.runner.backend.ops
    assert isinstance(ops, NativeOps), llm.llm_engine.runner.backend.describe()
    new = 33
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    rows = []
    for context in contexts:
        for n in streams:
            prompts = [[100 + (i * (j + 1)) % 2000 for i in range(context)] for j in range(n)]
            rates: dict[str, list[float]] = {"torch": [], "native": []}
            tokens = {}
            for r in range(rounds + 1):  # round 0 warms up
                for name in rates:
                    if name == "native":
                        within = contextlib.nullcontext()
                    else:
                        within = baseline(llm) if baseline else torch_methods(ops, patched)
                    with within:
                        outs = llm.generate(prompts, params, use_tqdm=False)
                    seconds = max(o.metrics.finished_time for o in outs) - max(o.metrics.first_token_time for o in outs)
                    tokens[name] = [t for o in outs for t in o.outputs[0].token_ids]
                    if r:
                        rates[name].append((new - 1) * n / seconds)
            agree = sum(a == b for a, b in zip(tokens["torch"], tokens["native"], strict=True)) / len(tokens["torch"])
            rows.append((context, n, rates["torch"], rates["native"], agree))
    return rows


def print_decode_table(
    path: Path,
    args: argparse.Namespace,
    patched: tuple[str, ...] = PATCHED,
    names: tuple[str, str] = ("torch", "native"),
    baseline: Callable[[LLM], contextlib.AbstractContextManager] | None = None,
) -> None:
    """decode_rates of args.contexts x args.streams as a table (print_rates)."""
    print_rates(decode_rates(path, args.contexts, args.streams, args.rounds, patched, baseline), names, args.rounds)


def print_rates(rates: list[tuple], names: tuple[str, str], rounds: int) -> None:
    """decode_rates' rows as a table: the baseline's (names[0]) and the native tokens/s, their ratio per round, the
    share of tokens agreeing."""
    before, after = names
    print(f"| context | streams | {before} | {after} | {after} / {before} per round | tokens agreeing |")
    print("|---:|---:|---:|---:|---:|---:|")
    for context, n, slow, fast, agree in rates:
        ratios = [f / s for s, f in zip(slow, fast, strict=True)]
        print(f"| {context} | {n} | {spread(slow, 1)} | {spread(fast, 1)} | {spread(ratios)} | {agree:.0%} |")
    print(f"\nmedians [min-max] over {rounds} rounds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--contexts", type=comma_ints, default="1024,4000", help="cached tokens per sequence, comma-separated"
    )
    ap.add_argument("--heads", type=comma_ints, default="16,128", help="query heads of the op table, comma-separated")
    ap.add_argument("--batches", type=comma_ints, default="1,4", help="sequences of the op table, comma-separated")
    ap.add_argument("--streams", type=comma_ints, default="1,4", help="streams of the model table, comma-separated")
    ap.add_argument("--scheme", default="w8a8_dynamic", help="the model table's int8 scheme")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    args = ap.parse_args()
    native_ops = NativeOps(native.load())
    print(f"native build: {native.ISA_NAMES[native_ops.lib.isa]}; {torch.get_num_threads()} threads\n")
    print("| heads | batch | context | torch, ms | native, ms | torch / native per round |")
    print("|---:|---:|---:|---:|---:|---:|")
    for heads in args.heads:
        for batch in args.batches:
            for context in args.contexts:
                t = op_times(native_ops, heads, batch, context, args.rounds)
                print(f"| {heads} | {batch} | {context} | {ms_cells(t)} |", flush=True)
    print("\n| heads | batch | kv_b_proj products: torch, ms | native, ms | torch / native per round |")
    print("|---:|---:|---:|---:|---:|")
    for heads in args.heads:
        for batch in args.batches:
            t = absorb_times(native_ops, heads, batch, args.rounds)
            print(f"| {heads} | {batch} | {ms_cells(t)} |", flush=True)
    path = quantized(deepseek_model(), args.scheme)
    print(f"\n{path.name}: decode tokens/s after a prompt of each context")
    print_decode_table(path, args)


if __name__ == "__main__":
    main()
