"""int8 compute kernels the quant methods call: GEMM with fused activation quantization and dequantization.

Each op has a pure-torch path (the definition) and, on AVX2 CPUs, a native path (kernels/native.py) that
computes the same numbers bit for bit: exact int32 products, then the same float steps in the same order.

Runtime weight forms made by `pack_weight` from int8 [N, K]:
- native CPU: int8 [N, Kp], K zero-padded to a multiple of 32 (1 byte per weight); for the AVX-512 VNNI build,
  each whole block of 16 rows re-laid so that one 64-byte load feeds 16 rows (`_block_rows`);
- CPU without the native kernels (or a weight holding -128, which the AVX2 trick cannot take): an exact fp32
  [K, N] copy multiplied in K-chunks of at most 1024, so every partial sum is an integer below 2^24 that fp32
  holds exactly (torch._int_mm has no vectorised CPU kernel without VNNI/AMX: 25-1000x slower than fp32 BLAS);
- CUDA: int8 [N, K] for torch._int_mm (cuBLASLt), activation rows padded past its minimum of 17 (cuda_gemm_rows).
"""

from __future__ import annotations

import torch

from slimquant.format.primitives import QMAX, QMIN, int8_matmul_reference
from slimquant.format.primitives import quantize_per_token as _quantize_per_token_torch
from slimquant.kernels import native, weight_memory
from slimquant.kernels.triton_kernels import triton_module

_EXACT_K = 1024  # 1024 * 128 * 128 = 2^24: fp32 sums of this many int8 products are exact
_BLOCK_ROWS = 16  # the VNNI build's row blocks (csrc/int8_cpu.cpp: kBlockRows)


def pack_weight(w_q: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """Runtime form of int8 weights [..., N, K] (see the module docstring) for the native build `isa` (default:
    the one that runs); a stack of experts packs alike."""
    if w_q.device.type != "cpu":
        return w_q
    if native.available() and (w_q.numel() == 0 or int(w_q.min()) > QMIN):
        k = w_q.shape[-1]
        padded = weight_memory.empty((*w_q.shape[:-1], _round_up(k, native.K_ALIGN)), torch.int8)  # [..., N, Kp]
        padded[..., k:] = 0
        padded[..., :k] = w_q
        if (isa or native.isa()) == "avx512vnni":
            _block_rows(padded)
        return padded
    return w_q.float().transpose(-1, -2).contiguous()  # [..., K, N]


def _block_rows(padded: torch.Tensor) -> None:
    """In place: each whole block of 16 rows [16, Kp] of padded [..., N, Kp] laid out as [Kp / 4, 16, 4], the
    VNNI kernels' form (csrc/int8_cpu.cpp); the last N % 16 rows stay as they are."""
    n, kp = padded.shape[-2:]
    full = n - n % _BLOCK_ROWS
    for matrix in padded.view(-1, n, kp) if full else ():  # one expert at a time: a temporary of one matrix
        rows = matrix[:full]  # [full, Kp], contiguous
        blocks = rows.view(full // _BLOCK_ROWS, _BLOCK_ROWS, kp // 4, 4)  # [B, 16, Kp/4, 4]
        rows.copy_(blocks.transpose(1, 2).reshape(full, kp))  # [B, Kp/4, 16, 4]


def _round_up(k: int, multiple: int) -> int:
    return (k + multiple - 1) // multiple * multiple


def _is_native(packed: torch.Tensor) -> bool:
    return packed.dtype == torch.int8 and packed.device.type == "cpu"


def int8_mm_packed(x_q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact int32 product x_q int8 [T, K] @ W^T for a weight made by pack_weight -> int32 [T, N]."""
    if _is_native(packed):
        x_q = native.rows_contiguous(x_q)
        out = torch.empty(x_q.shape[0], packed.shape[0], dtype=torch.int32)  # [T, N]
        native.library().sq_int8_gemm(
            x_q.data_ptr(), *_dims(x_q), packed.data_ptr(), packed.shape[0], packed.shape[1], out.data_ptr()
        )
        return out
    if packed.dtype == torch.int8:
        return int8_mm(x_q, packed)
    return _exact_float_mm(x_q, packed)


def dynamic_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8_DYNAMIC: y [T, N] = (int8(x) @ W^T) * s_t * w_scale (+ bias) in fp32, x [T, K] quantized per token;
    returned in out_dtype.

    w_scale: fp32 [N] (already rounded to the model dtype); bias [N] (added in fp32) or None.
    """
    if _on_triton(x, packed):
        return _cuda_int8().dynamic_linear(x, packed, w_scale, bias, out_dtype)
    return _dynamic_linear(x, packed, w_scale, None if bias is None else bias.float()).to(out_dtype)


def _dynamic_linear(x, packed, w_scale, bias) -> torch.Tensor:
    if _is_native(packed) and x.device.type == "cpu":
        xf = native.rows_contiguous(x.float())  # [T, K]
        y = torch.empty(xf.shape[0], packed.shape[0], dtype=torch.float32)  # [T, N]
        native.library().sq_dynamic_linear(
            xf.data_ptr(), *_dims(xf), packed.data_ptr(), packed.shape[0], packed.shape[1],
            w_scale.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        )  # fmt: skip
        return y
    x_q, s_t = quantize_per_token(x)  # [T, K] int8, [T, 1] fp32
    y = int8_mm_packed(x_q, packed).float() * s_t * w_scale  # [T, N]
    return y if bias is None else y + bias


def static_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    inv_scale: torch.Tensor,
    offset: torch.Tensor,
    quant_bias: torch.Tensor,
    deq_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A8: y [T, N] = float(int8(x) @ W^T + quant_bias) * deq_scale, x [T, K] quantized with one scale/offset;
    returned in out_dtype.

    inv_scale, offset: [1] in x's dtype (the quantization runs in it); quant_bias int32 [N]; deq_scale fp32 [N].
    """
    if _on_triton(x, packed):
        return _cuda_int8().static_linear(x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype)
    return _static_linear(x, packed, inv_scale, offset, quant_bias, deq_scale).to(out_dtype)


def _static_linear(x, packed, inv_scale, offset, quant_bias, deq_scale) -> torch.Tensor:
    if _is_native(packed) and x.dtype == torch.float32 and inv_scale.dtype == torch.float32:
        x = native.rows_contiguous(x)  # [T, K]
        y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32)  # [T, N]
        native.library().sq_static_linear(
            x.data_ptr(), *_dims(x), float(inv_scale), float(offset), packed.data_ptr(), packed.shape[0],
            packed.shape[1], quant_bias.data_ptr(), deq_scale.data_ptr(), y.data_ptr(),
        )  # fmt: skip
        return y
    acc = int8_mm_packed(quantize_static(x, inv_scale, offset), packed)  # [T, N] int32
    return (acc + quant_bias).float() * deq_scale


def _on_triton(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """CUDA int8 weights on cuBLASLt's grid of 8, where Triton is installed: the three-kernel path."""
    on_grid = packed.shape[-1] % 8 == 0 and packed.shape[0] % 8 == 0
    return x.device.type == "cuda" and on_grid and _cuda_int8() is not None


def _cuda_int8():
    """kernels/cuda_int8.py, or None where Triton is missing (the pure-torch path runs)."""
    return triton_module("cuda_int8")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8: x [T, K] -> (x_q int8 [T, K], scale fp32 [T, 1])."""
    if not (native.available() and x.device.type == "cpu"):
        return _quantize_per_token_torch(x)
    xf = native.rows_contiguous(x.float())  # [T, K]
    x_q = torch.empty(xf.shape, dtype=torch.int8)
    scale = torch.empty(xf.shape[0], 1, dtype=torch.float32)
    native.library().sq_quantize_per_token(xf.data_ptr(), *_dims(xf), x_q.data_ptr(), scale.data_ptr())
    return x_q, scale


def _dims(x: torch.Tensor) -> tuple[int, int, int]:
    """(rows, columns, row stride) of a 2-D tensor for the native kernels."""
    return x.shape[0], x.shape[1], x.stride(0)


def int8_mm(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 product x_q int8 [T, K] @ w_q int8 [N, K]^T -> int32 [T, N]."""
    if x_q.device.type == "cuda":
        return _cuda_int8_mm(x_q, w_q)
    if x_q.device.type == "cpu":
        return torch._int_mm(x_q, w_q.t())
    return int8_matmul_reference(x_q, w_q)


_CUDA_MIN_ROWS = 24  # torch._int_mm on CUDA needs more than 16 rows; a multiple of 8 keeps cuBLASLt aligned


def _cuda_int8_mm(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """cuBLASLt int8 GEMM via torch._int_mm: rows zero-padded to its minimum; K or N off its grid of 8 multiply
    in exact fp32 K-chunks instead (CUDA has no integer matmul for int64)."""
    t, k = x_q.shape
    if k % 8 or w_q.shape[0] % 8:
        return _exact_float_mm(x_q, w_q.float().t())
    rows = cuda_gemm_rows(t)
    x_pad = torch.nn.functional.pad(x_q, (0, 0, 0, rows - t)) if rows != t else x_q.contiguous()  # [rows, K]
    return torch._int_mm(x_pad, w_q.t())[:t]  # [T, N]


def cuda_gemm_rows(t: int) -> int:
    """Rows to give torch._int_mm on CUDA for t tokens."""
    return max(_round_up(t, 8), _CUDA_MIN_ROWS)


def _exact_float_mm(x_q: torch.Tensor, w_kn: torch.Tensor) -> torch.Tensor:
    """x_q int8 [T, K] @ w_kn (int8 values as fp32 [K, N]) in K-chunks of 1024, each partial sum exact -> int32."""
    x = x_q.float()  # [T, K]
    out = None
    for k in range(0, x.shape[1], _EXACT_K):
        part = (x[:, k : k + _EXACT_K] @ w_kn[k : k + _EXACT_K]).to(torch.int32)  # [T, N]
        out = part if out is None else out + part
    return out


def quantize_static(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8: clamp(round(x * inv_scale + offset)); x [T, K], inv_scale/offset in x's dtype."""
    return torch.clamp(torch.round(x * inv_scale + offset), QMIN, QMAX).to(torch.int8)
