"""Fused ops for a decoder layer's non-GEMM work: residual add + RMSNorm, SiLU-and-mul, decode attention.

A decode step of a small model is dominated by per-op overhead, not arithmetic: these replace a dozen torch
ops each with one call, native on CPU fp32, Triton on CUDA (kernels/cuda_layers.py). Each returns None where
neither applies, and the caller then runs its pure-torch definition.
"""

from __future__ import annotations

from types import ModuleType

import torch

from slimquant.kernels import native
from slimquant.kernels.triton_kernels import triton_module

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fp32_cpu(*ts: torch.Tensor | None) -> bool:
    """Every tensor given (None skipped) is fp32 on the CPU: the native kernels' dtype."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in ts)


KV_CACHE_DTYPES = (torch.float32, torch.bfloat16)  # what the native kernels store and read


def kv_caches_ready(*caches: torch.Tensor) -> bool:
    """Every cache is contiguous on the CPU in one dtype the native kernels hold (fp32 or bf16)."""
    dtype = caches[0].dtype
    return dtype in KV_CACHE_DTYPES and all(
        c.dtype == dtype and c.device.type == "cpu" and c.is_contiguous() for c in caches
    )


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda  # tests patch this to run the Triton kernels on CPU tensors, in Triton's interpreter


def cuda_layer_ops(*ts: torch.Tensor | None) -> ModuleType | None:
    """kernels/cuda_layers.py where every tensor given (None skipped) is on CUDA in one float dtype with unit
    column stride, and Triton is installed; else None."""
    live = [t for t in ts if t is not None]
    if not all(_is_cuda(t) and t.dtype == live[0].dtype and t.stride(-1) == 1 for t in live):
        return None
    return triton_module("cuda_layers") if live[0].dtype in _TRITON_DTYPES else None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(norm(x + residual) * weight (+ bias), x + residual) for x [T, H]; None where no fused op applies."""
    if x.dim() == 2 and (cuda := cuda_layer_ops(x, residual, weight, bias)) is not None:
        return cuda.add_rms_norm(x, residual, weight, bias, eps)
    if x.dim() != 2 or not native.available() or not fp32_cpu(x, residual, weight, bias):
        return None
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        return None
    t, h = x.shape
    summed, y = torch.empty(t, h), torch.empty(t, h)  # [T, H] each
    native.library().sq_add_rms_norm(
        x.data_ptr(), t, h, x.stride(0), None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
        eps, summed.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y, summed


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """Per-head RMSNorm of x [T, heads, D] (natively: each token's heads contiguous) -> [T, heads, D]; None where
    no fused op applies."""
    if (cuda := cuda_layer_ops(x, weight, bias)) is not None:
        return cuda.rms_norm_heads(x, weight, bias, eps)
    if not native.available() or not fp32_cpu(x, weight, bias) or not _heads_packed(x):
        return None
    t, heads, d = x.shape
    y = torch.empty(t, heads, d)  # [T, heads, D]
    native.library().sq_rms_norm_heads(
        x.data_ptr(), t, heads, d, x.stride(0), weight.data_ptr(), ptr_or_none(bias), eps, y.data_ptr(), heads * d
    )
    return y


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for x [T, 2I] = [gate | up] -> [T, I]; None where no fused op applies."""
    if x.dim() == 2 and (cuda := cuda_layer_ops(x)) is not None:
        return cuda.silu_and_mul(x)
    if x.dim() != 2 or x.stride(-1) != 1 or not native.available() or not fp32_cpu(x):
        return None
    t, inter = x.shape[0], x.shape[1] // 2
    y = torch.empty(t, inter)  # [T, I]
    native.library().sq_silu_and_mul(x.data_ptr(), t, inter, x.stride(0), y.data_ptr())
    return y


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    caches: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """One decode token per sequence: rotate q/k (neox, if rope), store k/v at slots, attend -> [B, NH * D].

    q [B, NH, D], k/v [B, KVH, D] (rows may be strided); rope: (cos, sin) [B, D]; caches [NB, BS, KVH, D], fp32
    or bf16; slots int64 [B]; block_tables int32 [B, max_blocks]; context_lens int32 [B]. None where it does not
    apply.
    """
    k_cache, v_cache = caches
    cos, sin = rope if rope is not None else (None, None)
    if not native.available() or not fp32_cpu(q, k, v, cos, sin) or not kv_caches_ready(k_cache, v_cache):
        return None
    if not (_heads_packed(q) and _heads_packed(k) and _heads_packed(v)):
        return None
    if cos is not None and not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    b, nh, d = q.shape
    out = torch.empty(b, nh * d)  # [B, NH * D]
    native.library().sq_decode_attention(
        q=q.data_ptr(), ldq=q.stride(0), k=k.data_ptr(), ldk=k.stride(0), v=v.data_ptr(), ldv=v.stride(0),
        cos=ptr_or_none(cos), sin=ptr_or_none(sin), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
        step=step_rows(slots, block_tables, context_lens, k_cache), num_heads=nh, num_kv_heads=k.shape[1],
        head_dim=d, scale=scale, out=out.data_ptr(),
    )  # fmt: skip
    return out


def _heads_packed(x: torch.Tensor) -> bool:
    """x [T, heads, D] with each token's heads contiguous (a row stride of its own is fine)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def ptr_or_none(t: torch.Tensor | None) -> int | None:
    """t's data pointer, or None (a null pointer for ctypes)."""
    return None if t is None else t.data_ptr()


def step_rows(slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, cache: torch.Tensor):
    """An SqStep (csrc/exports.h) for rows with these slots [B] int64, block tables [B, W] int32 and context
    lengths [B] int32 over caches like `cache` [.., NB, BS, KVH, D] (its dtype and block size)."""
    return native.library().structs["SqStep"](
        batch=slots.shape[0], kv_bf16=int(cache.dtype == torch.bfloat16), block_size=cache.shape[-3],
        max_blocks=block_tables.shape[1], slots=slots.data_ptr(), block_tables=block_tables.data_ptr(),
        context_lens=context_lens.data_ptr(),
    )  # fmt: skip
