"""int8 linears on CUDA: the activations quantized by the op before the linear where it can (RMSNorm,
SiLU-and-mul: kernels/cuda_layers.py) or by a quantize kernel here, then one int8 GEMM with the dequantization in
its epilogue: cuBLASLt (torch._int_mm) and a dequantize kernel, or one Triton GEMM (split-K for few tokens).

Each kernel computes docs/FORMAT.md's numbers in the pure-torch path's order and precision (IEEE division, round
half to even, the model dtype's rounding where the activations are quantized in it, no FMA contraction), so the
int8 values equal that path's and so, op for op, should the floats (tests/gpu checks the int8 values exactly and
the floats to 2 ulps). The int32 sums are exact in any order, split-K's too. Needs Triton (bundled with CUDA
builds of torch); `TRITON_INTERPRET=1` runs the kernels on CPU tensors for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimquant.kernels.int8_input import PER_TOKEN, InputQuant, Int8Rows
from slimquant.kernels.int_mm import cuda_gemm_rows

_BLOCK_K = 1024
_BLOCK_N = 128
_DEQ_BLOCK_M = 16
_EXACT = {"enable_fp_fusion": False}  # no FMA contraction: each multiply and add rounds, as torch's separate ops


@triton.jit
def _rint(v):
    """Round half to even (torch.round) of fp32 v, with no fast-math assumption."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _round_to(v, dt: tl.constexpr):
    """fp32 v rounded to dtype dt (to nearest even, as torch's elementwise ops in dt), back in fp32.
    bf16 rounds on the bits (the interpreter's own bf16 cast truncates), so tests and GPUs agree."""
    if dt == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    if dt == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _to_int8(v):
    """clamp(rint(v), -128, 127) as int8."""
    return tl.minimum(tl.maximum(_rint(v), -128.0), 127.0).to(tl.int8)


@triton.jit
def _token_scale(amax):
    """A token's scale from its max |x|: max(amax / 127, 1e-8) (format.primitives' smallest scale)."""
    return tl.maximum(tl.math.div_rn(amax, 127.0), 1e-8)


@triton.jit
def _static_value(x, inv, off, dt: tl.constexpr):
    """x * inv + off with each step rounded to dt (the static quantization runs in the model dtype)."""
    return _round_to(_round_to(x * inv, dt) + off, dt)


@triton.jit
def _quantize_per_token(x_ptr, stride_x, q_ptr, scale_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of x [T, K]: scale = max(amax / 127, tiny); q = clamp(rint(x / scale), -128, 127)."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = _token_scale(tl.max(amax, axis=0))
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row.to(tl.int64) * K + offs, _to_int8(tl.math.div_rn(x, scale)), mask=offs < K)


@triton.jit
def _quantize_static(x_ptr, stride_x, inv_ptr, off_ptr, q_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of x [T, K]: q = clamp(rint(x * inv + off), -128, 127), each step rounded to x's dtype."""
    row = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    inv, off = tl.load(inv_ptr).to(tl.float32), tl.load(off_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row.to(tl.int64) * K + offs, _to_int8(_static_value(x, inv, off, dt)), mask=offs < K)


@triton.jit
def _dequantize_tile(acc, row_scale, col_scale, add, STATIC: tl.constexpr, HAS_ADD: tl.constexpr):
    """int32 acc [BM, BN] -> fp32: dynamic (acc * s_t) * w_scale (+ bias); static (acc + quant_bias) * deq_scale.
    row_scale [BM], col_scale / add [BN]."""
    if STATIC:
        y = (acc + add[None, :]).to(tl.float32) * col_scale[None, :]
    else:
        y = acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]
        if HAS_ADD:
            y = y + add[None, :].to(tl.float32)
    return y


@triton.jit
def _store_rows(y_ptr, y, rows, cols, N, mask):
    """y fp32 [BM, BN] rounded to y_ptr's dtype at rows x cols of y [T, N]."""
    dt = y_ptr.dtype.element_ty
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], _round_to(y, dt).to(dt), mask=mask)


@triton.jit
def _epilogue_operands(row_scale_ptr, col_scale_ptr, add_ptr, rows, cols, rmask, cmask, STATIC: tl.constexpr):
    """(row scales [BM], column scales [BN], bias or quant_bias [BN]) with masked lanes 0."""
    col_scale = tl.load(col_scale_ptr + cols, mask=cmask, other=0.0)
    add = tl.load(add_ptr + cols, mask=cmask, other=0)
    if STATIC:  # noqa: SIM108 (a constexpr branch: the load exists only in the other)
        row_scale = rows.to(tl.float32) * 0.0  # [BM], unused
    else:
        row_scale = tl.load(row_scale_ptr + rows, mask=rmask, other=0.0)
    return row_scale, col_scale, add


@triton.jit
def _dequantize(
    acc_ptr, y_ptr, M, T, N, row_scale_ptr, col_scale_ptr, add_ptr,
    SPLITS: tl.constexpr, STATIC: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Tile (m, n) of y [T, N] from int32 acc [SPLITS, M, N] (M >= T rows; split K's partial sums, added exactly)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < T, cols < N
    mask = rmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for s in range(SPLITS):
        acc += tl.load(acc_ptr + (s * M + rows).to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0)
    row_scale, col_scale, add = _epilogue_operands(
        row_scale_ptr, col_scale_ptr, add_ptr, rows, cols, rmask, cmask, STATIC
    )
    _store_rows(y_ptr, _dequantize_tile(acc, row_scale, col_scale, add, STATIC, HAS_ADD), rows, cols, N, mask)


@triton.jit
def _int8_dot(
    a_at, w_at, rmask, cmask, k_left, K_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """int32 [BM, BN] = sum over k_left columns of a [BM, K] @ w [BN, K]^T, from pointers a_at [BM, BK] and
    w_at [BK, BN] at the first column, in BLOCK_K steps over K_LOOP (>= k_left) columns."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K_LOOP, BLOCK_K):  # constexpr bounds: Triton's interpreter takes no other
        a = tl.load(a_at, mask=rmask[:, None] & (ks[None, :] < k_left - k0), other=0)
        w = tl.load(w_at, mask=(ks[:, None] < k_left - k0) & cmask[None, :], other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)
        a_at += BLOCK_K
        w_at += BLOCK_K
    return acc


@triton.jit
def _int8_gemm(
    a_ptr, w_ptr, out_ptr, M, N, row_scale_ptr, col_scale_ptr, add_ptr,
    K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, STATIC: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Tile (m, n) of a int8 [M, K] @ w int8 [N, K]^T over split s's K_PER_SPLIT columns of K: the dequantized
    y [M, N] where SPLITS is 1, else int32 partial sums into out [SPLITS, M, N] (_dequantize adds them)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    k_left = tl.minimum(K - tl.program_id(2) * K_PER_SPLIT, K_PER_SPLIT)  # this split's columns of K
    rmask, cmask = rows < M, cols < N
    k_start = tl.program_id(2) * K_PER_SPLIT
    a_at = a_ptr + rows.to(tl.int64)[:, None] * K + k_start + ks[None, :]  # [BM, BK]
    w_at = w_ptr + cols.to(tl.int64)[None, :] * K + k_start + ks[:, None]  # [BK, BN]
    acc = _int8_dot(a_at, w_at, rmask, cmask, k_left, K_PER_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = rmask[:, None] & cmask[None, :]
    if SPLITS == 1:
        row_scale, col_scale, add = _epilogue_operands(
            row_scale_ptr, col_scale_ptr, add_ptr, rows, cols, rmask, cmask, STATIC
        )
        _store_rows(out_ptr, _dequantize_tile(acc, row_scale, col_scale, add, STATIC, HAS_ADD), rows, cols, N, mask)
    else:
        tl.store(out_ptr + (tl.program_id(2) * M + rows).to(tl.int64)[:, None] * N + cols[None, :], acc, mask=mask)


@dataclass(frozen=True)
class GemmTiles:
    """One launch shape of _int8_gemm: tile sizes, K split in SPLITS parts, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    splits: int
    warps: int = 4
    stages: int = 3


def gemm_tiles(t: int, n: int, k: int, programs: int = 264) -> GemmTiles:
    """Tiles for t tokens: a small M tile and K split until about `programs` programs stream the weight
    (decode, t <= 16: bandwidth-bound), wider tiles without a split for more tokens (compute-bound)."""
    if t <= 16:
        bm, bn, bk, warps = 16, 64, 256, 4
    elif t <= 128:
        bm, bn, bk, warps = 64, 128, 128, 4
    else:
        bm, bn, bk, warps = 128, 128, 128, 8
    tiles = triton.cdiv(t, bm) * triton.cdiv(n, bn)
    splits = max(1, min(programs // max(tiles, 1), k // (4 * bk)))  # each split: 4 K-blocks or more
    return GemmTiles(bm, bn, bk, splits, warps)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] with unit column stride (a view where it has one)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _block(k: int) -> int:
    return min(triton.next_power_of_2(k), _BLOCK_K)


def q_buffer(t: int, k: int, device: torch.device) -> torch.Tensor:
    """int8 [R, K] with R >= _int_mm's minimum; rows past T are left as they are (their products are dropped)."""
    return torch.empty(cuda_gemm_rows(t), k, dtype=torch.int8, device=device)


def quantize(x: torch.Tensor, quant: InputQuant) -> Int8Rows:
    """x [T, K] float quantized as quant says."""
    x = _rows(x)
    t, k = x.shape
    q = q_buffer(t, k, x.device)
    if quant.inv_scale is not None:
        _quantize_static[(t,)](x, x.stride(0), quant.inv_scale, quant.offset, q, K=k, BLOCK=_block(k), **_EXACT)
        return Int8Rows(q, None, t, x.dtype)
    scale = torch.empty(t, dtype=torch.float32, device=x.device)
    _quantize_per_token[(t,)](x, x.stride(0), q, scale, K=k, BLOCK=_block(k), **_EXACT)
    return Int8Rows(q, scale, t, x.dtype)


def int8_linear(
    a: Int8Rows, w_q: torch.Tensor, col_scale: torch.Tensor, add: torch.Tensor | None, gemm: str = "cublas",
    tiles: GemmTiles | None = None,
) -> torch.Tensor:  # fmt: skip
    """y [T, N] in a.dtype from quantized activations and w_q int8 [N, K]: dynamic (a.scale given):
    acc * s_t * w_scale (+ bias: add); static: (acc + quant_bias: add) * deq_scale (col_scale). gemm "cublas"
    (torch._int_mm + a dequantize kernel; K and N multiples of 8) or "triton" (one kernel; tiles: gemm_tiles'
    unless given)."""
    static = a.scale is None
    (n, k), t = w_q.shape, a.t
    y = torch.empty(t, n, dtype=a.dtype, device=w_q.device)  # [T, N]
    row_scale = col_scale if static else a.scale
    flags = dict(STATIC=static, HAS_ADD=add is not None, **_EXACT)
    add = col_scale if add is None else add
    if gemm == "cublas":
        acc = torch._int_mm(a.q, w_q.t())  # [R, N] int32
        _dequantize_all(acc, y, 1, row_scale, col_scale, add, flags)
        return y
    tiles = tiles or gemm_tiles(t, n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.splits), tiles.block_k) * tiles.block_k
    splits = triton.cdiv(k, k_per_split)  # tiles.splits or fewer: every split holds whole K blocks
    out = y if splits == 1 else torch.empty(splits, t, n, dtype=torch.int32, device=w_q.device)
    grid = (triton.cdiv(t, tiles.block_m), triton.cdiv(n, tiles.block_n), splits)
    _int8_gemm[grid](
        a.q, w_q, out, t, n, row_scale, col_scale, add, K=k, K_PER_SPLIT=k_per_split, SPLITS=splits,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.warps,
        num_stages=tiles.stages, **flags,
    )  # fmt: skip
    if splits > 1:
        _dequantize_all(out, y, splits, row_scale, col_scale, add, flags)
    return y


def _dequantize_all(acc, y, splits: int, row_scale, col_scale, add, flags: dict) -> None:
    """y [T, N] from int32 acc [splits, M >= T, N]."""
    (t, n), m = y.shape, acc.shape[-2]
    grid = (triton.cdiv(t, _DEQ_BLOCK_M), triton.cdiv(n, _BLOCK_N))
    _dequantize[grid](
        acc, y, m, t, n, row_scale, col_scale, add, SPLITS=splits, BLOCK_M=_DEQ_BLOCK_M, BLOCK_N=_BLOCK_N, **flags
    )


def dynamic_linear(x, w_q, w_scale, bias, gemm: str = "cublas") -> torch.Tensor:
    """W8A8_DYNAMIC: x [T, K] float (or Int8Rows quantized per token), w_q int8 [N, K], w_scale fp32 [N], bias
    [N] or None -> y [T, N] in x's dtype."""
    a = x if isinstance(x, Int8Rows) else quantize(x, PER_TOKEN)
    return int8_linear(a, w_q, w_scale, bias, gemm)


def static_linear(x, w_q, inv_scale, offset, quant_bias, deq_scale, gemm: str = "cublas") -> torch.Tensor:
    """W8A8: x [T, K] float quantized with inv_scale / offset [1] in x's dtype (or Int8Rows quantized so);
    y [T, N] = (acc + quant_bias) * deq in x's dtype."""
    a = x if isinstance(x, Int8Rows) else quantize(x, InputQuant(inv_scale, offset))
    return int8_linear(a, w_q, deq_scale, quant_bias, gemm)
