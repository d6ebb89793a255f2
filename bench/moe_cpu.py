"""DeepSeek's routed W8A8_DYNAMIC experts on the CPU: one native call per MoE layer (NativeOps.grouped_experts,
csrc/moe_cpu.cpp) against RoutedExperts running them one by one (per expert: its tokens' rows indexed, the two
dynamic linears and SiLU-and-mul as separate ops, the weighted rows added back), side by side in one run. Both
give the same bits; the difference is the per-expert Python and torch ops.

- One MoE layer's routed experts of a DeepSeek-V2-Lite-shaped model (bench/prefill_attention.py --deepseek's:
  hidden 2048, experts of 1408, 6 of 16 per token, random weights) on T tokens routed by the layer's router: the
  median ms per call of each over --rounds rounds, alternating, and the ratio per round (median [min-max]).
- That model's greedy decode tokens/s of --streams streams after a prompt of each context length (the prefill
  untimed), alternating on one LLM (bench/mla_decode.py's decode_rates), and the share of tokens that agree.

With --qwen3-moe only a model table runs, of a Qwen3-30B-A3B-shaped model cut to --layers layers (hidden 2048,
32 heads of 128 and 4 kv heads, 128 routed experts of 768 per layer, 8 per token, a 32768-token vocabulary; random
weights): decode steps per op (the attention's ops one by one, the routed experts in their one call) against the
whole step in one native call (native_stack.py: the router and the experts inside it), alternating on one LLM;
with --tensor-parallel N on N ranks (each expert's intermediate rows split, or with --expert-parallel whole experts
per rank), each rank switching alike, rank 0's rates printed.

With --glm the same table for a GLM-4.5-Air-shaped model (GLM_45_AIR_SHAPE: every layer MoE, 64 routed experts of
1408 and a shared one, the biased sigmoid router, rope on half of each head; random weights); with --deepseek for the
DeepSeek-V2-Lite-shaped model above (MLA decode absorbed in the whole step; --layers does not apply), with
--deepseek-v3 for a DeepSeek-V3 / Kimi-K2-shaped one (DEEPSEEK_V3_SHAPE: 128 heads, q_lora; 16 routed experts), with
--deepseek-v2 for a DeepSeek-V2-shaped one (DEEPSEEK_V2_SHAPE: the softmax router limited to the best 3 of 8 groups;
32 routed experts), with --qwen2-moe for a Qwen2-57B-A14B-shaped one (QWEN2_57B_A14B_SHAPE: a gated shared expert;
16 routed experts), with --glm-flash for a GLM-4.7-Flash-shaped one (GLM_47_FLASH_SHAPE: MLA with v heads wider
than the k heads' non-rope part; 32 routed experts).

With --router only a router table runs: Qwen3-MoE's softmax router and DeepSeek-V3 / Kimi-K2 / GLM-4.5's biased
sigmoid one (TopkRouter) on T random rows at their shapes, TorchOps' torch ops against NativeOps' one call
(csrc/moe_cpu.cpp; BLAS's logits above 128 rows), ms per call alternating over --rounds rounds, and whether both
pick the same experts.

With --slots the layer table's baseline is the one call returning the [T, K, H] slots, summed per token in expert
order in torch after it (the path before 75b2537, and still expert parallel's), and the model table is left out.

With --tensor-parallel N the layer table runs on N ranks (N processes of cores / N threads, gloo), each holding
1 / N of every expert's intermediate size (tensor parallel without expert parallel): one by one, the ranks reduce
between the linears from Python; in one call, from inside it. The model table is then left out
(bench/parallel.py --deepseek runs the model split over ranks).

    .venv/bin/python bench/moe_cpu.py [--tokens 1,4,16,512] [--contexts 64,1024] [--streams 1,4,16]
        [--scheme w8a8_dynamic] [--rounds 5] [--tensor-parallel N] [--slots]
        [--qwen3-moe | --qwen2-moe | --glm | --deepseek | --deepseek-v2 | --deepseek-v3 [--layers 4]
        [--expert-parallel]] [--router]

Run it on a quiet machine: with 2 OpenMP threads, any other busy process stalls every parallel op.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._options import comma_ints  # noqa: E402
from bench.mla_decode import (  # noqa: E402
    alternate_ms,
    decode_rates,
    ms_cells,
    print_decode_table,
    print_rates,
    torch_and_native,
    torch_methods,
)
from bench.prefill_attention import deepseek_model  # noqa: E402
from bench.speed import quantized  # noqa: E402
from slimquant import LLM, zoo  # noqa: E402
from slimquant.backends.native_ops import NativeOps  # noqa: E402
from slimquant.backends.torch_ops import TorchOps, add_in_expert_order  # noqa: E402
from slimquant.distributed.launch import run_ranks  # noqa: E402
from slimquant.kernels import native  # noqa: E402
from slimquant.layers.moe import SparseMoE, TopkRouter  # noqa: E402
from slimquant.random_models import make_tiny_model  # noqa: E402

CALLS = 10  # layer calls per timed sample
QWEN3_30B_A3B_SHAPE = dict(
    hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], vocab_size=32768, max_position_embeddings=40960,
)  # fmt: skip


# GLM-4.5-Air's layer shapes (hidden 4096, 96 heads of 128 and 8 kv heads, experts of 1408, 8 per token, a shared
# expert, rope on half of each head), every layer MoE, half its experts (64 of 128: the same work per token but
# the router's; a layer's bf16 weights 2.2 GB instead of 4.4)
GLM_45_AIR_SHAPE = dict(
    hidden_size=4096, num_attention_heads=96, num_key_value_heads=8, head_dim=128, intermediate_size=10944,
    n_routed_experts=64, num_experts_per_tok=8, moe_intermediate_size=1408, n_shared_experts=1, n_group=1,
    topk_group=1, first_k_dense_replace=0, routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=False,
    attention_bias=True, vocab_size=32768, max_position_embeddings=131072,
)  # fmt: skip
# DeepSeek-V3 / Kimi-K2's layer shapes (hidden 7168, 128 heads, q_lora 1536, latent 512 + 64, experts of 2048 of
# which 8 per token plus a shared one, the biased sigmoid router), the first layer dense, 16 of the routed experts
# (the same work per token but the router's), a 4096-token vocabulary
DEEPSEEK_V3_SHAPE = dict(
    hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048,
    n_routed_experts=16, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, vocab_size=4096, max_position_embeddings=8192,
)  # fmt: skip
# Qwen2-57B-A14B's layer shapes (hidden 3584, 28 heads of 128 and 4 kv heads, q/k/v biases, experts of 2560 of
# which 8 per token, the shared expert of 20480 and its gate), every layer MoE, 16 of its 64 routed experts (the same
# work per token but the router's), a 32768-token vocabulary
QWEN2_57B_A14B_SHAPE = dict(
    hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, num_experts=16,
    num_experts_per_tok=8, moe_intermediate_size=2560, shared_expert_intermediate_size=20480, norm_topk_prob=False,
    decoder_sparse_step=1, mlp_only_layers=[], vocab_size=32768, max_position_embeddings=32768,
)  # fmt: skip
# DeepSeek-V2's layer shapes (hidden 5120, 128 heads, q_lora 1536, latent 512 + 64, experts of 1536 of which 6 per
# token from the best 3 of 8 groups, 2 shared ones, the softmax router), the first layer dense, 32 of its 160 routed
# experts (4 per group: the same work per token but the router's), a 4096-token vocabulary
DEEPSEEK_V2_SHAPE = dict(
    hidden_size=5120, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
    n_routed_experts=32, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, n_group=8, topk_group=3,
    routed_scaling_factor=16.0, norm_topk_prob=False, vocab_size=4096, max_position_embeddings=8192,
)  # fmt: skip
# GLM-4.7-Flash's layer shapes (hidden 2048, 20 heads, q_lora 768, latent 512 + 64, k heads of 192 + 64 and v heads
# of 256, experts of 1536 of which 4 per token plus a shared one, the biased sigmoid router), the first layer dense,
# 32 of its 64 routed experts (the same work per token but the router's), a 32768-token vocabulary
GLM_47_FLASH_SHAPE = dict(
    hidden_size=2048, num_attention_heads=20, num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512,
    qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, intermediate_size=10240, moe_intermediate_size=1536,
    n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1,
    routed_scaling_factor=1.8, norm_topk_prob=True, vocab_size=32768, max_position_embeddings=8192,
)  # fmt: skip
MODEL_SHAPES = {
    "qwen3-30b-a3b": ("qwen3_moe", QWEN3_30B_A3B_SHAPE),
    "glm-4.7-flash": ("glm4_moe_lite", GLM_47_FLASH_SHAPE),
    "qwen2-57b-a14b": ("qwen2_moe", QWEN2_57B_A14B_SHAPE),
    "deepseek-v2": ("deepseek_v2", DEEPSEEK_V2_SHAPE),
    "glm-4.5-air": ("glm4_moe", GLM_45_AIR_SHAPE),
    "deepseek-v3": ("deepseek_v3", DEEPSEEK_V3_SHAPE),
}


def moe_model(name: str, layers: int) -> Path:
    """MODEL_SHAPES[name] cut to `layers` layers with random bf16 weights, built once into the cache."""
    out = zoo.cache_dir() / "bench" / f"{name}-shape-{layers}-layers-random"
    if not (out / "config.json").is_file():
        print(f"writing {out} (random weights)", flush=True)
        arch, shape = MODEL_SHAPES[name]
        make_tiny_model(arch, out, torch.bfloat16, num_hidden_layers=layers, **shape)
    return out


def qwen3_moe_rates(rank: int, size: int, path: Path, args: argparse.Namespace) -> list[tuple]:
    """decode_rates of per_op_steps against the whole step on this rank of size (every rank runs the same steps)."""
    ranks = dict(tensor_parallel_size=size, enable_expert_parallel=args.expert_parallel) if size > 1 else {}
    return decode_rates(path, args.contexts, args.streams, args.rounds, baseline=per_op_steps, llm_kwargs=ranks)


@contextlib.contextmanager
def per_op_steps(llm: LLM) -> Iterator[None]:
    """Within: llm's cpu-native backend runs every step per op (its whole-step stack off)."""
    backend = llm.llm_engine.runner.backend
    stack, backend.stack = backend.stack, None
    try:
        yield
    finally:
        backend.stack = stack


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


# model -> (model_type, hidden, routed experts, groups, groups per token, experts per token), as their config.json
# give them (Qwen3-MoE: the softmax router; the others: the biased sigmoid one)
ROUTER_SHAPES = {
    "Qwen3-30B-A3B": ("qwen3_moe", 2048, 128, 1, 1, 8),
    "DeepSeek-V3": ("deepseek_v3", 7168, 256, 8, 4, 8),
    "Kimi-K2": ("deepseek_v3", 7168, 384, 1, 1, 8),
    "GLM-4.5": ("glm4_moe", 5120, 160, 1, 1, 8),
    "GLM-4.5-Air": ("glm4_moe", 4096, 128, 1, 1, 8),
}


def router_rows(tokens: list[int], rounds: int) -> list[str]:
    """The router table's rows: each shape's TopkRouter (random weights and bias) on T random rows, TorchOps
    against NativeOps, ms per call and whether both pick the same experts."""
    ops, rows = NativeOps(native.load()), []
    for name, (model_type, h, e, groups, topk_group, k) in ROUTER_SHAPES.items():
        scaling = None if model_type == "qwen3_moe" else 2.5
        config = argparse.Namespace(
            model_type=model_type, hidden_size=h, num_experts=e, num_experts_per_tok=k, n_group=groups,
            topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=scaling,
        )  # fmt: skip
        router = TopkRouter(config)
        gen = torch.Generator().manual_seed(e)
        router.weight.copy_(torch.randn(e, h, generator=gen) / h**0.5)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.copy_(torch.randn(e, generator=gen) * 0.1)
        for t in tokens:
            steps = torch_and_native(ops, partial(_route, router, torch.randn(t, h, generator=gen)))
            same = torch.equal(steps["torch"]()[1], steps["native"]()[1])  # the experts' ids [T, K]
            times = {n: [ms / CALLS for ms in values] for n, values in alternate_ms(steps, rounds).items()}
            rows.append(f"| {name} | {t} | {ms_cells(times)} | {same} |")
    return rows


def _route(router: TopkRouter, x: torch.Tensor, ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:
    """CALLS calls of router on x with ops; the last one's (weights, ids)."""
    router.ops = ops
    for _ in range(CALLS):
        out = router(x)
    return out


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
    ap.add_argument("--qwen3-moe", action="store_true", help="only a Qwen3-MoE model table: per op vs whole step")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the --qwen3-moe model")
    ap.add_argument("--expert-parallel", action="store_true", help="--qwen3-moe on N ranks: whole experts per rank")
    ap.add_argument("--glm", action="store_true", help="--qwen3-moe's table for a GLM-4.5-Air-shaped model")
    ap.add_argument("--deepseek", action="store_true", help="--qwen3-moe's table for the DeepSeek-V2-Lite shape")
    ap.add_argument("--deepseek-v3", action="store_true", help="--qwen3-moe's table for the DeepSeek-V3 shape")
    ap.add_argument("--deepseek-v2", action="store_true", help="--qwen3-moe's table for the DeepSeek-V2 shape")
    ap.add_argument("--qwen2-moe", action="store_true", help="--qwen3-moe's table for the Qwen2-57B-A14B shape")
    ap.add_argument("--glm-flash", action="store_true", help="--qwen3-moe's table for the GLM-4.7-Flash shape")
    ap.add_argument("--router", action="store_true", help="only the routers' table: torch ops vs one call")
    args = ap.parse_args()
    if args.tensor_parallel < 1 or args.layers < 1:
        ap.error("--tensor-parallel and --layers must be at least 1")
    size = args.tensor_parallel
    threads = max(1, torch.get_num_threads() // size)
    if args.router:
        print(f"native build: {native.ISA_NAMES[native.load().isa]}; {threads} threads\n")
        print("| model | tokens | torch, ms | native, ms | torch / native per round | same experts |")
        print("|---|---:|---:|---:|---:|---|")
        print("\n".join(router_rows(args.tokens, args.rounds)), flush=True)
        return
    presets = {"glm": "glm-4.5-air", "deepseek_v3": "deepseek-v3", "deepseek_v2": "deepseek-v2"}
    presets |= {"qwen2_moe": "qwen2-57b-a14b", "qwen3_moe": "qwen3-30b-a3b", "glm_flash": "glm-4.7-flash"}
    if args.deepseek or any(getattr(args, flag) for flag in presets):
        name = next((name for flag, name in presets.items() if getattr(args, flag)), None)
        model = deepseek_model() if args.deepseek else moe_model(name, args.layers)
        path = quantized(model, args.scheme)
        ranks = f", {size} ranks ({'expert parallel' if args.expert_parallel else 'experts split'})" if size > 1 else ""
        print(f"native build: {native.ISA_NAMES[native.load().isa]}; {threads} threads{ranks}; {path.name}")
        print("\ndecode tokens/s after a prompt of each context")
        if size == 1:
            rates = qwen3_moe_rates(0, 1, path, args)
        else:
            rates = run_ranks(qwen3_moe_rates, size, path, args, timeout=3600, threads=threads)[0]
        print_rates(rates, ("per op", "whole step"), args.rounds)
        return
    path = quantized(deepseek_model(), args.scheme)
    if size == 1:
        rows = layer_rows(0, 1, path, args.tokens, args.rounds, args.slots)
    else:
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
