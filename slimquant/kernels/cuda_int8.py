"""int8 linears on CUDA in three kernels: quantize the activations (Triton), int8 GEMM (cuBLASLt via
torch._int_mm), dequantize (Triton).

The pure-torch path spends about fifteen kernels per linear on the same math; a small model's decode step is
bound by kernel count, not bytes, even as a CUDA graph. Each kernel here computes docs/FORMAT.md's numbers in the
pure-torch path's order and precision (IEEE division, round half to even, the model dtype's rounding where the
activations are quantized in it, no FMA contraction), so the int8 values equal that path's and so, op for op,
should the floats (tests/cuda checks the int8 values exactly and the floats to 2 ulps). Needs Triton (bundled
with CUDA builds of torch); `TRITON_INTERPRET=1` runs the kernels on CPU tensors for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimquant.kernels.int_mm import cuda_gemm_rows

_BLOCK_K = 1024
_BLOCK_N = 128
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
def _quantize_per_token(x_ptr, stride_x, q_ptr, scale_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of x [T, K]: scale = max(amax / 127, tiny); q = clamp(rint(x / scale), -128, 127)."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), 1e-8)  # format.primitives. smallest scale
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, scale)), -128.0), 127.0)
        tl.store(q_ptr + row.to(tl.int64) * K + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def _quantize_static(x_ptr, stride_x, inv_ptr, off_ptr, q_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of x [T, K]: q = clamp(rint(x * inv + off), -128, 127), each step rounded to x's dtype."""
    row = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    inv, off = tl.load(inv_ptr).to(tl.float32), tl.load(off_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = _round_to((_round_to(x * inv, dt) + off), dt)
        q = tl.minimum(tl.maximum(_rint(v), -128.0), 127.0)
        tl.store(q_ptr + row.to(tl.int64) * K + offs, q.to(tl.int8), mask=offs < K)


@triton.jit
def _dequantize(
    acc_ptr, y_ptr, N, row_scale_ptr, col_scale_ptr, add_ptr,
    STATIC: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Row r of acc int32 [R, N] -> y [T, N] in y's dtype.
    dynamic: (acc * s_t[r]) * w_scale (+ bias); static: (acc + quant_bias) * deq_scale."""
    row, cols = tl.program_id(0), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.load(acc_ptr + row.to(tl.int64) * N + cols, mask=mask, other=0)
    col_scale = tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
    if STATIC:
        y = (acc + tl.load(add_ptr + cols, mask=mask, other=0)).to(tl.float32) * col_scale
    else:
        y = acc.to(tl.float32) * tl.load(row_scale_ptr + row) * col_scale
        if HAS_ADD:
            y = y + tl.load(add_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    tl.store(y_ptr + row.to(tl.int64) * N + cols, _round_to(y, dt).to(dt), mask=mask)  # exact: already rounded


@triton.jit
def _fused_linear(
    x_ptr, stride_x, w_ptr, y_ptr, M, N, col_scale_ptr, add_ptr, inv_ptr, off_ptr,
    K: tl.constexpr, STATIC: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Tile [BLOCK_M, BLOCK_N] of y = x [M, K] @ w_q [N, K]^T with x quantized on the fly (per token, or static)
    and the dequantization in the epilogue: the numbers of _quantize_* + _int_mm + _dequantize."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask, cmask = rows < M, cols < N
    dt = x_ptr.dtype.element_ty
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # [BM, 1]
    if STATIC:
        inv, off = tl.load(inv_ptr).to(tl.float32), tl.load(off_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            x = tl.load(x_rows + k0 + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-8)  # [BM]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        x = tl.load(x_rows + k0 + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if STATIC:  # noqa: SIM108 (a constexpr branch: inv exists only in it)
            v = _round_to(_round_to(x * inv, dt) + off, dt)
        else:
            v = tl.math.div_rn(x, scale[:, None])
        q = tl.minimum(tl.maximum(_rint(v), -128.0), 127.0)
        q = tl.where(kmask[None, :], q, 0.0).to(tl.int8)  # [BM, BK]; K's tail adds nothing
        w = tl.load(
            w_ptr + cols.to(tl.int64)[None, :] * K + k0 + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0
        )  # [BK, BN]
        acc += tl.dot(q, w, out_dtype=tl.int32)
    col_scale = tl.load(col_scale_ptr + cols, mask=cmask, other=0.0)
    if STATIC:
        y = (acc + tl.load(add_ptr + cols, mask=cmask, other=0)[None, :]).to(tl.float32) * col_scale[None, :]
    else:
        y = acc.to(tl.float32) * scale[:, None] * col_scale[None, :]
        if HAS_ADD:
            y = y + tl.load(add_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_dt = y_ptr.dtype.element_ty
    y_at = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_at, _round_to(y, out_dt).to(out_dt), mask=rmask[:, None] & cmask[None, :])


def _fused(x, w_q, out_dtype, col_scale, add, inv=None, off=None) -> torch.Tensor:
    """y [T, N] of the one-kernel linear (dynamic where inv is None, else static)."""
    x = _rows(x)
    (t, k), n = x.shape, w_q.shape[0]
    y = torch.empty(t, n, dtype=out_dtype, device=x.device)  # [T, N]
    block_m = 16 if t <= 16 else 64
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, 64))
    dummy = col_scale
    _fused_linear[grid](
        x, x.stride(0), w_q, y, t, n, col_scale, dummy if add is None else add,
        dummy if inv is None else inv, dummy if off is None else off, K=k, STATIC=inv is not None,
        HAS_ADD=add is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, **_EXACT,
    )  # fmt: skip
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] with unit column stride (a view where it has one)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _block(k: int) -> int:
    return min(triton.next_power_of_2(k), _BLOCK_K)


def _q_buffer(t: int, k: int, device: torch.device) -> torch.Tensor:
    """int8 [R, K] with R >= _int_mm's minimum; rows past T are left as they are (their products are dropped)."""
    return torch.empty(cuda_gemm_rows(t), k, dtype=torch.int8, device=device)


def _matmul_dequantize(q, w_q, t, out_dtype, row_scale, col_scale, add, static: bool) -> torch.Tensor:
    acc = torch._int_mm(q, w_q.t())  # [R, N] int32
    n = w_q.shape[0]
    y = torch.empty(t, n, dtype=out_dtype, device=q.device)  # [T, N]
    dummy = col_scale if add is None else add
    _dequantize[(t, triton.cdiv(n, _BLOCK_N))](
        acc, y, n, col_scale if row_scale is None else row_scale, col_scale, dummy,
        STATIC=static, HAS_ADD=add is not None, BLOCK_N=_BLOCK_N, **_EXACT,
    )  # fmt: skip
    return y


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float -> (int8 [R, K] whose first T rows hold the quantized x, scales fp32 [T])."""
    x = _rows(x)
    t, k = x.shape
    q, scale = _q_buffer(t, k, x.device), torch.empty(t, dtype=torch.float32, device=x.device)
    _quantize_per_token[(t,)](x, x.stride(0), q, scale, K=k, BLOCK=_block(k), **_EXACT)
    return q, scale


def quantize_static(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [T, K] float, inv_scale / offset [1] in x's dtype -> int8 [R, K] whose first T rows hold the quantized x."""
    x = _rows(x)
    t, k = x.shape
    q = _q_buffer(t, k, x.device)
    _quantize_static[(t,)](x, x.stride(0), inv_scale, offset, q, K=k, BLOCK=_block(k), **_EXACT)
    return q


def dynamic_linear(x, w_q, w_scale, bias, out_dtype: torch.dtype, fused: bool = False) -> torch.Tensor:
    """W8A8_DYNAMIC: x [T, K] float, w_q int8 [N, K] (K, N multiples of 8), w_scale fp32 [N], bias [N] or None
    -> y [T, N] in out_dtype. fused: one kernel instead of three (quantize inside the GEMM's K loop, dequantize in
    its epilogue), the same numbers."""
    if fused:
        return _fused(x, w_q, out_dtype, w_scale, bias)
    q, scale = quantize_per_token(x)
    return _matmul_dequantize(q, w_q, x.shape[0], out_dtype, scale, w_scale, bias, static=False)


def static_linear(
    x, w_q, inv_scale, offset, quant_bias, deq_scale, out_dtype: torch.dtype, fused: bool = False
) -> torch.Tensor:
    """W8A8: x [T, K] quantized with inv_scale / offset [1] in x's dtype; y [T, N] = (acc + quant_bias) * deq;
    fused as in dynamic_linear."""
    if fused:
        return _fused(x, w_q, out_dtype, deq_scale, quant_bias, inv_scale, offset)
    q = quantize_static(x, inv_scale, offset)
    return _matmul_dequantize(q, w_q, x.shape[0], out_dtype, None, deq_scale, quant_bias, static=True)
