"""Inputs and a one-expert-at-a-time reference for the grouped MoE kernels (kernels/cuda_moe.py), on the CPU (Triton's
interpreter) or a GPU."""

from __future__ import annotations

import torch

from slimquant.format import primitives as P
from slimquant.kernels.int8_input import PER_TOKEN


def moe_inputs(t: int, e: int, top_k: int, h: int, inter: int, dtype: torch.dtype, seed: int = 0):
    """(x [T, H], w13 [E, 2I, H], w13_scale [E, 2I], w2 [E, H, I], w2_scale [E, H], topk_weights, topk_ids)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, h, generator=gen) * 2).to(dtype)
    w13 = torch.randint(-128, 128, (e, 2 * inter, h), generator=gen, dtype=torch.int8)
    w2 = torch.randint(-128, 128, (e, h, inter), generator=gen, dtype=torch.int8)
    s13 = (torch.rand(e, 2 * inter, generator=gen) / 500).to(dtype)
    s2 = (torch.rand(e, h, generator=gen) / 500).to(dtype)
    ids = torch.rand(t, e, generator=gen).argsort(dim=-1)[:, :top_k]  # distinct experts per token
    weights = torch.rand(t, top_k, generator=gen)
    return x, w13, s13, w2, s2, weights, ids


def one_expert_at_a_time(x, w13, s13, w2, s2, weights, ids) -> torch.Tensor:
    """[T, K, H]: RoutedExperts' per-expert loop in plain torch (SiLU-and-mul: the kernel the grouped path calls,
    which test_triton_layers checks against torch)."""
    from slimquant.kernels import cuda_layers

    x_q, s_t = P.quantize_per_token(x)  # [T, H], [T, 1]
    out = torch.full((*ids.shape, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    for e in ids.unique().tolist():
        tokens, slots = torch.where(ids == e)
        gate_up = (_int8_mm(x_q[tokens], w13[e]).float() * s_t[tokens] * s13[e].float()).to(x.dtype)
        act = cuda_layers.silu_and_mul(gate_up, PER_TOKEN)
        acc = _int8_mm(act.q[: len(tokens)], w2[e])  # [n, H]
        y = (acc.float() * act.scale[:, None] * s2[e].float()).to(x.dtype)
        out[tokens, slots] = (y * weights[tokens, slots, None]).to(x.dtype)
    return out


def rank_part(rank: int, size: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 rows, w2 columns) of this rank's part of every expert's intermediate size: its gate rows, then its up
    rows; its down columns."""
    cols = torch.arange(rank * inter // size, (rank + 1) * inter // size)
    return torch.cat([cols, cols + inter]), cols


SPLIT_CASES = [(1, 8, 2, 64, 48), (5, 6, 3, 72, 40), (40, 5, 3, 100, 40)]  # t, e, top_k, h, inter


def rank_split_experts(rank: int, size: int, device: str, dtypes: tuple[torch.dtype, ...]) -> list[bool]:
    """Whether this rank's part of every expert (its gate / up rows and down columns of inter / size) gives the
    whole layer's values in kernels/cuda_moe.py, per dtype and case, the ranks reducing between the kernels (gloo;
    on the CPU, Triton's interpreter)."""
    from slimquant.distributed.tensor_parallel import TensorParallel
    from slimquant.kernels import cuda_moe

    tp, same = TensorParallel.from_default_group(size), []
    for dtype in dtypes:
        for t, e, top_k, h, inter in SPLIT_CASES:
            inputs = moe_inputs(t, e, top_k, h, inter, dtype, seed=t + e + h)
            x, w13, s13, w2, s2, weights, ids = (v.to(device) for v in inputs)
            rows, cols = rank_part(rank, size, inter)
            got = cuda_moe.routed_experts(x, w13[:, rows], s13[:, rows], w2[..., cols], s2, weights, ids, tp=tp)
            same.append(torch.equal(got, one_expert_at_a_time(x, w13, s13, w2, s2, weights, ids)))
    return same


def _int8_mm(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 x_q [T, K] @ w_q [N, K]^T, computed on the CPU, on x_q's device."""
    return P.int8_matmul_reference(x_q.cpu(), w_q.cpu()).to(x_q.device)
