"""A MoE layer's routed int8 experts on CUDA in five kernels, whatever the number of experts: the tokens quantized
once, one grouped GEMM for every expert's gate/up, SiLU-and-mul quantizing per row, one grouped GEMM for every
expert's down projection (scaled by its routing weight in the epilogue). The routing stays on the device (no host
sync), so a step's shapes depend only on its token count. Under tensor parallel without expert parallel (each rank
holds a part of every expert's intermediate size), the ranks take a MAX of each row's activation absmax before it is
quantized, and the down GEMM writes its int32 sums, which the ranks add before a last pass dequantizes them: no host
sync either.

Routing as vLLM's fused MoE does it: the (token, k) slots are sorted by expert, and each expert's run of sorted rows
is cut into blocks of BLOCK_M rows; a program computes one block's rows against one tile of its expert's weight.
Each output element is the per-expert path's number (RoutedExperts' loop): the same int32 sums (exact in any order),
dequantized in the same fp32 order and rounded to the model dtype where it rounds (kernels/cuda_int8.py's rules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.format.primitives import quantize_per_token
from slimquant.kernels.cuda_int8 import _EXACT, _dequantize_tile, _int8_dot, _round_to, _store_rows, quantize
from slimquant.kernels.cuda_layers import silu_and_mul
from slimquant.kernels.int8_input import PER_TOKEN, Int8Rows


@dataclass(frozen=True)
class ExpertBlocks:
    """Slots sorted by expert and cut into blocks of at most block_m rows of one expert, all on the device.
    order int64 [S]: the slot (token * K + k) at each sorted row; expert / row0 / end int32 [B]: each block's
    expert (-1: an unused block), first sorted row and its expert's end row; B is fixed by S, E and block_m."""

    order: torch.Tensor
    expert: torch.Tensor
    row0: torch.Tensor
    end: torch.Tensor


def expert_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int, first: int | None = None) -> ExpertBlocks:
    """The blocks of topk_ids [T, K] without a host sync: expert ids in [0, num_experts), or with first given, in
    [first, first + num_experts) for the blocks (this rank's experts) and any other id for none (sorted last)."""
    ids = topk_ids.reshape(-1).long()  # [S]: slot s = token * K + k
    if first is not None:  # other ranks' experts go to a bin after ours, which gets no block
        ids = ids - first
        ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    s = ids.numel()
    order = ids.argsort(stable=True)  # [S]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts = counts.scatter_add_(0, ids, torch.ones_like(ids))[:num_experts]  # [E]
    ends = counts.cumsum(0)  # [E]: each expert's end row in sorted order
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_ends = blocks.cumsum(0)  # [E]
    most = triton.cdiv(s, block_m) + min(num_experts, s)  # sum of ceil(c_e / block_m) is at most this
    b = torch.arange(most, device=ids.device)  # [B]
    e = torch.searchsorted(block_ends, b, right=True).clamp(max=num_experts - 1)  # [B]: the expert of block b
    used = b < block_ends[-1]
    row0 = ends[e] - counts[e] + (b - (block_ends[e] - blocks[e])) * block_m  # [B]
    expert = torch.where(used, e, -1).to(torch.int32)
    return ExpertBlocks(order, expert, row0.to(torch.int32), torch.where(used, ends[e], 0).to(torch.int32))


@dataclass(frozen=True)
class MoeTiles:
    """One launch shape of _grouped_int8_gemm."""

    block_m: int
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3


def moe_tiles(slots: int, num_experts: int) -> MoeTiles:
    """Small blocks where each expert gets a few rows (decode), larger ones where it gets many (prefill)."""
    if slots <= 4 * num_experts:
        return MoeTiles(16, 64, 256)
    return MoeTiles(64, 128, 128, warps=8 if slots > 64 * num_experts else 4)


@triton.jit
def _grouped_int8_gemm(
    a_ptr, a_rows_ptr, w_ptr, y_ptr, y_rows_ptr, row_scale_ptr, col_scale_ptr, mult_ptr,
    expert_ptr, row0_ptr, end_ptr, N,
    K: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_Y: tl.constexpr, HAS_MULT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Tile (block b, n) for the sorted rows r of block b, of expert e: acc = a[ra] @ w[e]^T (int8 [., K],
    w int8 [E, N, K]) with ra = a_rows[r] (GATHER_A) or r; y[ry] = round(acc * row_scale[ra] * col_scale[e]), then
    (HAS_MULT) round(that * mult[ry]), with ry = y_rows[r] (SCATTER_Y) or r. y [., N] in the model dtype.
    ACC 1: y int32 [., N] = acc, nothing more; ACC 2: acc is a's int32 row ra [N] (summed over the ranks)."""
    e = tl.load(expert_ptr + tl.program_id(0))
    if e < 0:
        return
    rows = tl.load(row0_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)  # [BM] sorted rows
    rmask = rows < tl.load(end_ptr + tl.program_id(0))
    a_rows, y_rows = rows, rows
    if GATHER_A:
        a_rows = tl.load(a_rows_ptr + rows, mask=rmask, other=0)
    if SCATTER_Y:
        y_rows = tl.load(y_rows_ptr + rows, mask=rmask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    if ACC == 2:
        acc = tl.load(a_ptr + a_rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0)  # [BM, BN]
    else:
        ks = tl.arange(0, BLOCK_K)
        a_at = a_ptr + a_rows.to(tl.int64)[:, None] * K + ks[None, :]  # [BM, BK]
        w_at = w_ptr + (e.to(tl.int64) * N + cols)[None, :] * K + ks[:, None]  # [BK, BN]
        acc = _int8_dot(a_at, w_at, rmask, cmask, K, K, BLOCK_M, BLOCK_N, BLOCK_K)
    if ACC == 1:
        tl.store(y_ptr + y_rows.to(tl.int64)[:, None] * N + cols[None, :], acc, mask=mask)
        return
    row_scale = tl.load(row_scale_ptr + a_rows, mask=rmask, other=0.0)
    col_scale = tl.load(col_scale_ptr + e.to(tl.int64) * N + cols, mask=cmask, other=0.0).to(tl.float32)
    y = _dequantize_tile(acc, row_scale, col_scale, col_scale, STATIC=False, HAS_ADD=False)
    if HAS_MULT:
        y = _round_to(y, y_ptr.dtype.element_ty) * tl.load(mult_ptr + y_rows, mask=rmask, other=0.0)[:, None]
    _store_rows(y_ptr, y, y_rows, cols, N, mask)


def _grouped_gemm(
    a_q, a_rows, w_q, y, y_rows, row_scale, col_scale, mult, blocks: ExpertBlocks, tiles, acc: int = 0
) -> None:
    """y rows (sorted rows, or scattered to y_rows) from a_q's rows (sorted, or gathered from a_rows) and each
    block's expert of w_q [E, N, K]: see _grouped_int8_gemm (acc: its ACC)."""
    n, k = w_q.shape[1], w_q.shape[2]
    grid = (blocks.expert.numel(), triton.cdiv(n, tiles.block_n))
    _grouped_int8_gemm[grid](
        a_q, a_rows if a_rows is not None else blocks.order, w_q, y, y_rows if y_rows is not None else blocks.order,
        row_scale, col_scale, mult if mult is not None else row_scale, blocks.expert, blocks.row0, blocks.end, n,
        K=k, GATHER_A=a_rows is not None, SCATTER_Y=y_rows is not None, HAS_MULT=mult is not None, ACC=acc,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.warps,
        num_stages=tiles.stages, **_EXACT,
    )  # fmt: skip


def routed_experts(
    x: torch.Tensor | Int8Rows,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    first: int | None = None,
    tiles: MoeTiles | None = None,
    tp: TensorParallel = SINGLE,
) -> torch.Tensor:
    """Each (token, k) slot's weighted expert output [T, K, H] in x's dtype: x [T, H] float, or quantized per token
    (Int8Rows: its dtype); w13 int8 [E, 2I, H]
    (gate rows, then up rows), w2 int8 [E, H, I], scales [E, 2I] / [E, H] (any float dtype); topk_weights fp32 and
    topk_ids [T, K]. first: these are experts first .. first + E - 1 of more (expert parallel), and the slots
    routed to others are 0. tp: each expert's intermediate size is split over tp's ranks (w13: this rank's gate
    and up rows, w2: its down columns); the ranks agree on each row's activation absmax and sum the int32 down
    products, so every rank returns one process's output."""
    assert first is None or tp.size == 1, "expert parallel holds whole experts"
    t, top_k = topk_ids.shape
    (num_experts, inter2, h), s = w13.shape, t * top_k
    tiles = tiles or moe_tiles(s, num_experts)
    blocks = expert_blocks(topk_ids, num_experts, tiles.block_m, first)
    a = x if isinstance(x, Int8Rows) else quantize(x, PER_TOKEN)  # q int8 [R >= T, H], scale fp32 [T]
    alloc = torch.empty if first is None else torch.zeros  # other ranks' slots: rows no block writes
    gate_up = alloc(s, inter2, dtype=a.dtype, device=a.q.device)  # [S, 2I] in sorted order
    _grouped_gemm(a.q, blocks.order // top_k, w13, gate_up, None, a.scale, w13_scale, None, blocks, tiles)
    act = silu_and_mul(gate_up, PER_TOKEN) if tp.size == 1 else _split_activation(gate_up, tp)  # sorted order
    out = alloc(s, h, dtype=a.dtype, device=a.q.device)  # [S, H]: each slot routed to these experts written once
    weights = topk_weights.reshape(-1).float()  # [S]
    if tp.size == 1:
        _grouped_gemm(act.q, None, w2, out, blocks.order, act.scale, w2_scale, weights, blocks, tiles)
        return out.view(t, top_k, h)
    acc = torch.empty(s, h, dtype=torch.int32, device=a.q.device)  # [S, H] in sorted order: every row written
    _grouped_gemm(act.q, None, w2, acc, None, act.scale, w2_scale, None, blocks, tiles, acc=1)
    tp.sum(acc)  # the whole intermediate size's int32 products
    _grouped_gemm(acc, None, w2, out, blocks.order, act.scale, w2_scale, weights, blocks, tiles, acc=2)
    return out.view(t, top_k, h)


def _split_activation(gate_up: torch.Tensor, tp: TensorParallel) -> Int8Rows:
    """silu(gate) * up of this rank's part of each row [S, 2I / tp] -> [S, I / tp], quantized per row with the
    whole row's absmax (a MAX over the ranks): one process's int8 values of these columns."""
    y = silu_and_mul(gate_up)  # [S, I / tp] in the model dtype
    absmax = tp.max(y.float().abs().amax(dim=-1, keepdim=True))  # [S, 1]
    q, scale = quantize_per_token(y, absmax)  # [S, I / tp] int8, [S, 1] fp32
    return Int8Rows(q, scale.view(-1), len(y), y.dtype)
