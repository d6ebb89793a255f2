"""MLA decode attention on CUDA (DeepSeek V2 / V3, Kimi-K2, with kv_b_proj absorbed): one query token per sequence
attends over the paged latent cache in place, instead of gathering each sequence's cache (to the longest, or in a
CUDA graph to the table's width) and running SDPA over the copy.

Each cached token is [latent (R) | roped k_pe (P)]; a query is [q_lat (R) | q_pe (P)]. score = q_lat . latent +
q_pe . k_pe, and the output is softmax(scores) @ latent [NH, R] (kv_b_proj's value half is applied after). A program
takes 16 query heads of one sequence over its part of the block table, with tensor-core dots in the cache's dtype
(fp32 accumulation; fp32 models in IEEE fp32) and online softmax; the parts combine as flash-decoding's
(kernels/cuda_layers.py's _combine_splits). The softmax weights meet the latents rounded to the cache's dtype, as in
flash attention, so bf16 results agree with the torch path (TorchOps.mla_decode) to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimquant.kernels.cuda_int8 import _EXACT
from slimquant.kernels.cuda_layers import _combine_splits, _store_heads, decode_splits, table_parts

HEADS = 16  # query heads per program: a tensor-core tile's rows


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """x as a dot operand: in its dtype, or fp32 where UPCAST (Triton's interpreter multiplies bf16 wrongly)."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _mla_decode(
    q_ptr, stride_qb, c_ptr, tables_ptr, stride_tb, W, lens_ptr, o_ptr, part_acc, part_m, part_l, scale, NH,
    W_LOOP: tl.constexpr, SPLITS: tl.constexpr, G: tl.constexpr, R: tl.constexpr, P: tl.constexpr,
    BS: tl.constexpr, BS_BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (b, head group, split s): query heads group * G .. of sequence b over blocks s * W_LOOP ... of its
    table. SPLITS 1: the output o [B, NH, R]; else the split's running max, denominator and unnormalized sum into
    part_m / part_l [B, groups, SPLITS, G] and part_acc [B, groups, SPLITS, G, R] fp32."""
    b, group, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    gs, rs, ps, ts = tl.arange(0, G), tl.arange(0, R), tl.arange(0, P), tl.arange(0, BS_BLOCK)
    heads = group * G + gs  # [G]
    q_row = q_ptr + b * stride_qb + heads[:, None] * (R + P)
    q_lat = _operand(tl.load(q_row + rs[None, :], mask=(heads < NH)[:, None], other=0.0), UPCAST)  # [G, R]
    q_pe = _operand(tl.load(q_row + R + ps[None, :], mask=(heads < NH)[:, None], other=0.0), UPCAST)  # [G, P]
    length = tl.load(lens_ptr + b)
    m = tl.full([G], float("-inf"), tl.float32)  # running max
    denom = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, R], tl.float32)
    for jj in range(0, W_LOOP):  # a constexpr bound (Triton's interpreter takes no runtime one)
        j = split * W_LOOP + jj
        if (j < W) & (j * BS < length):
            block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
            valid = (ts < BS) & (j * BS + ts < length)  # [BS]
            token = c_ptr + (block * BS + ts)[:, None] * (R + P)  # [BS, 1]
            latent = _operand(tl.load(token + rs[None, :], mask=valid[:, None], other=0.0), UPCAST)  # [BS, R]
            k_pe = _operand(tl.load(token + R + ps[None, :], mask=valid[:, None], other=0.0), UPCAST)  # [BS, P]
            s = tl.dot(q_lat, tl.trans(latent), input_precision=PRECISION)  # [G, BS]
            s = (s + tl.dot(q_pe, tl.trans(k_pe), input_precision=PRECISION)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)  # [G]
            p = tl.exp(s - m_new[:, None])  # [G, BS]
            acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision=PRECISION)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
    if SPLITS == 1:
        _store_heads(o_ptr + b * NH * R, o_ptr, o_ptr, o_ptr, acc, denom, heads, rs, (heads < NH)[:, None], R, False)
    else:
        at = (b * tl.num_programs(1) + group) * SPLITS + split
        tl.store(part_m + at * G + gs, m)
        tl.store(part_l + at * G + gs, denom)
        tl.store(part_acc + (at * G + gs)[:, None] * R + rs[None, :], acc)


def mla_decode(
    q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
    rank: int, splits: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [B, NH, R + P] (contiguous) over the latent cache [NB, BS, R + P] (same dtype) by block_tables int32 [B, W]
    and context_lens int32 [B] (device) -> [B, NH, R] in q's dtype; R = rank and P powers of two, NH at most 16 or a
    multiple of 16."""
    assert q.shape[1] <= HEADS or q.shape[1] % HEADS == 0, "the combine writes whole groups of 16 heads"
    b, nh, d = q.shape
    bs, w, groups = cache.shape[1], block_tables.shape[1], triton.cdiv(nh, HEADS)
    splits, per_split = table_parts(w, splits or decode_splits(b, groups, w))
    out = torch.empty(b, nh, rank, dtype=q.dtype, device=q.device)  # [B, NH, R]
    part_acc = part_m = part_l = out  # unused where splits is 1
    if splits > 1:
        part_m = torch.empty(b, groups, splits, HEADS, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(b, groups, splits, HEADS, rank, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 or _INTERPRETED else "tf32"  # tf32: unused by 16-bit dots
    _mla_decode[(b, groups, splits)](
        q, q.stride(0), cache, block_tables, block_tables.stride(0), w, context_lens, out, part_acc, part_m, part_l,
        scale, nh, W_LOOP=per_split, SPLITS=splits, G=HEADS, R=rank, P=d - rank, BS=bs,
        BS_BLOCK=max(16, triton.next_power_of_2(bs)), PRECISION=precision, UPCAST=_INTERPRETED, **_EXACT,
    )  # fmt: skip
    if splits > 1:
        heads = dict(KVH=groups, G=min(nh, HEADS), G_BLOCK=HEADS, D=rank, D_BLOCK=rank)  # nh: <= 16 or 16 * n
        parts = (part_acc, part_m, part_l, out, out, out, out, nh * rank)  # (the int8 output's: unused)
        _combine_splits[(b, groups)](*parts, SPLITS=splits, **heads, QUANT=False, **_EXACT)
    return out


_INTERPRETED = not isinstance(_mla_decode, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 when it was defined
