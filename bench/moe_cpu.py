"""DeepSeek's routed W8A8_DYNAMIC experts on the CPU: one native call per MoE layer (NativeOps.grouped_experts,
csrc/moe_cpu.cpp) against RoutedExperts running them one by one (per expert: its tokens' rows indexed, the two
dynamic linears and SiLU-and-mul as separate ops, the weighted rows added back), side by side in one run. Both
give the same bits; the difference is the per-expert Python and torch ops.

- One MoE layer's routed experts of a DeepSeek-V2-Lite-shaped model (bench/prefill_attention.py --deepseek's:
  hidden 2048, experts of 1408, 6 of 16 per token, random weights) on T tokens routed by the layer's router: the
  median ms per call of each over --rounds rounds, alternating, and the ratio per round (median [min-max]).
- That model's greedy decode tokens/s of --streams streams after a prompt of each context length (the prefill
  untimed), alternating on one LLM (bench/mla_decode.py's decode_rates), and the share of tokens that agree.

With --slots the layer table's baseline is the one call returning the [T, K, H] slots, summed per token in expert
order in torch after it (the path before 75b2537, and still expert parallel's), and the model table is left out.

With --tensor-parallel N the layer table runs on N ranks (N processes of cores / N threads, gloo), each holding
1 / N of every expert's intermediate size (tensor parallel without expert parallel): one by one, the ranks reduce
between the linears from Python; in one call, from inside it. The model table is then left out
(bench/parallel.py --deepseek runs the model split over ranks).

    .venv/bin/python bench/moe_cpu.py [--tokens 1,4,16,512] [--contexts 64,1024] [--streams 1,4,16]
        [--scheme w8a8_dynamic] [--rounds 5] [--tensor-parallel N] [--slots]

Run it on a quiet machine: with 2 OpenMP threads, any other busy process stalls every parallel op.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._options import comma_ints  # noqa: E402
from bench.mla_decode import alternate_ms, ms_cells, print_decode_table, torch_methods  # noqa: E402
from bench.prefill_attention import deepseek_model  # noqa: E402
from bench.speed import quantized  # noqa: E402
from slimquant import LLM  # noqa: E402
from slimquant.backends.native_ops import NativeOps  # noqa: E402
from slimquant.backends.torch_ops import add_in_expert_order  # noqa: E402
from slimquant.distributed.launch import run_ranks  # noqa: E402
from slimquant.kernels import native  # noqa: E402
from slimquant.layers.moe import SparseMoE  # noqa: E402

CALLS = 10  # layer calls per timed sample


def layer_times(
    moe: SparseMoE, ops: NativeOps, t: int, rounds: int, slots: bool = False
) -> tuple[dict[str, list[float]], bool]:
    """ms per call of the layer's routed experts on t random rows, one by one (or, slots, in one call that returns
    the [T, K, H] slots, summed by add_in_expert_order after it: before 75b2537) and in one call; equal outputs."""
    x = torch.randn(t, moe.experts.w2.shape[1], generator=torch.Generator().manual_seed(t))  # [T, H] fp32
    weights, ids = moe.gate(x)

    def run(baseline: bool) -> torch.Tensor:
        if baseline and slots:
            ops.grouped_experts = partial(_slots_then_sum, ops)  # this instance only
        try:
            with torch_methods(ops, ("grouped_experts",) if baseline and not slots else ()):  # TorchOps': one by one
                for _ in range(CALLS):
                    out = moe.experts(x, weights, ids)
        finally:
            vars(ops).pop("grouped_experts", None)
        return out

    with torch.inference_mode():
        same = torch.equal(run(True), run(False))
        baseline = "slots, then summed" if slots else "one by one"
        times = alternate_ms({baseline: lambda: run(True), "one call": lambda: run(False)}, rounds)
    return {name: [ms / CALLS for ms in values] for name, values in times.items()}, same


def _slots_then_sum(ops: NativeOps, *args, summed: bool = False, **kwargs) -> torch.Tensor | None:
    """The one call returning each slot's product [T, K, H], the slots then added in expert order in torch."""
    outs = NativeOps.grouped_experts(ops, *args, **kwargs)
    topk_ids = args[6]  # x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, ...
    return add_in_expert_order(outs, topk_ids) if summed and outs is not None else outs


def layer_rows(rank: int, size: int, path: Path, tokens: list[int], rounds: int, slots: bool = False) -> list[str]:
    """The layer table's rows (a header line first) on this rank of size, its LLM holding its part of the model;
    every rank makes the same calls (their collectives pair up)."""
    llm = LLM(str(path), max_model_len=64, tensor_parallel_size=size)
    ops = llm.llm_engine.runner.backend.ops
    assert isinstance(ops, NativeOps), llm.llm_engine.runner.backend.describe()
    moe = next(m for m in llm.llm_engine.runner.model.modules() if isinstance(m, SparseMoE))
    ranks = f", {size} ranks (experts split)" if size > 1 else ""
    rows = [f"native build: {native.ISA_NAMES[ops.lib.isa]}; {torch.get_num_threads()} threads{ranks}; {path.name}"]
    for t in tokens:
        times, same = layer_times(moe, ops, t, rounds, slots)
        rows.append(f"| {t} | {ms_cells(times)} | {same} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=comma_ints, default="1,4,16,512", help="rows of the layer table")
    ap.add_argument("--contexts", type=comma_ints, default="64,1024", help="prompt tokens of the model table")
    ap.add_argument("--streams", type=comma_ints, default="1,4,16", help="streams of the model table")
    ap.add_argument("--scheme", default="w8a8_dynamic", help="the model's int8 scheme")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    ap.add_argument("--tensor-parallel", type=int, default=1, help="ranks of the layer table (experts split)")
    ap.add_argument("--slots", action="store_true", help="layer table only, its baseline the slots summed in torch")
    args = ap.parse_args()
    if args.tensor_parallel < 1:
        ap.error("--tensor-parallel must be at least 1")
    path = quantized(deepseek_model(), args.scheme)
    size = args.tensor_parallel
    if size == 1:
        rows = layer_rows(0, 1, path, args.tokens, args.rounds, args.slots)
    else:
        threads = max(1, torch.get_num_threads() // size)
        rows = run_ranks(layer_rows, size, path, args.tokens, args.rounds, args.slots, timeout=3600, threads=threads)
        rows = rows[0]
    print(rows[0] + "\n")
    base = "slots, then summed" if args.slots else "one by one"
    print(f"| tokens | {base}, ms | one call, ms | {base} / one call per round | same output |")
    print("|---:|---:|---:|---:|---|")
    print("\n".join(rows[1:]), flush=True)
    if size == 1 and not args.slots:
        print("\ndecode tokens/s after a prompt of each context")
        print_decode_table(path, args, ("grouped_experts",), ("one by one", "one call"))


if __name__ == "__main__":
    main()
