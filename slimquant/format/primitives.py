"""The int8 quantization math of the ascend (ModelSlim) format, in plain torch.

Every function here is the definition that the quantizer writes and the engine reads (docs/FORMAT.md):
weights are symmetric per output channel, static activations are per-tensor asymmetric (min-max),
dynamic activations are symmetric per token. round() is torch.round: half to even.
"""

from __future__ import annotations

import torch

QMIN, QMAX = -128, 127
_TINY = 1e-8  # smallest scale: a channel of zeros quantizes to zeros, never to NaN


def _over_127(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127, one IEEE division on every device (CUDA turns division by a Python scalar into a multiply by
    its reciprocal, which can land an ulp away)."""
    return amax / torch.full((), 127.0, dtype=amax.dtype, device=amax.device)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w [N, K] -> (w_q int8 [N, K], scale fp32 [N, 1])."""
    w = w.float()
    lo, hi = w.aminmax(dim=1, keepdim=True)  # [N, 1] each; no |w| copy of the weight
    scale = _over_127(torch.maximum(-lo, hi)).clamp(min=_TINY)  # [N, 1]
    w_q = (w / scale).round_().clamp_(QMIN, QMAX).to(torch.int8)  # one fp32 temporary, not three
    return w_q, scale


def dequantize_weight(w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w_q int8 [N, K] * scale [N, 1] -> fp32 [N, K]."""
    return w_q.float() * scale.float()


def static_activation_params(x_min: float, x_max: float) -> tuple[float, float]:
    """Per-tensor asymmetric min-max parameters: (input_scale, input_offset), offset integer-valued."""
    x_min, x_max = min(float(x_min), 0.0), max(float(x_max), 0.0)
    scale = max(x_max / 255.0 - x_min / 255.0, _TINY)
    offset = float(round(-x_min / scale) - 128)
    return scale, max(min(offset, QMAX), QMIN)


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """Static W8A8 activation quantization, as the runtime does it: input_scale cast to the model dtype, then its
    reciprocal taken in that dtype (vLLM-Ascend's order).

    x: [..., K] in the model dtype; input_scale, input_offset: [1]. Returns int8 [..., K].
    """
    inv = 1.0 / input_scale.to(x.dtype)
    x_q = torch.round(x * inv + input_offset.to(x.dtype))
    return torch.clamp(x_q, QMIN, QMAX).to(torch.int8)


def quantize_per_token(x: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8: x [T, K] -> (x_q int8 [T, K], scale fp32 [T, 1]); absmax [T, 1] fp32:
    each token's max |x| when x is a part of the row (tensor parallel), else taken from x."""
    xf = x.float()
    if absmax is None:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    scale = _over_127(absmax).clamp(min=_TINY)  # [T, 1]
    x_q = torch.clamp(torch.round(xf / scale), QMIN, QMAX).to(torch.int8)
    return x_q, scale


def deq_scale(input_scale: float, weight_scale: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """deq_scale [N] = input_scale * weight_scale: fp32 for bf16 models, else fp32 bits as int64."""
    d = (float(input_scale) * weight_scale.float().reshape(-1)).to(torch.float32)  # [N]
    if model_dtype == torch.bfloat16:
        return d
    return d.view(torch.int32).to(torch.int64)


def decode_deq_scale(d: torch.Tensor) -> torch.Tensor:
    """Inverse of deq_scale(): fp32 [N] from either stored form."""
    if d.dtype == torch.int64:
        return d.to(torch.int32).view(torch.float32)
    return d.float()


def quant_bias(bias: torch.Tensor | None, deq: torch.Tensor, w_q: torch.Tensor, input_offset: float) -> torch.Tensor:
    """quant_bias int32 [N] = round(bias / deq_scale - rowsum(W_q) * input_offset)."""
    deq = decode_deq_scale(deq).double()  # [N]
    b = torch.zeros_like(deq) if bias is None else bias.double().reshape(-1)
    rowsum = w_q.to(torch.int64).sum(dim=1).double()  # [N]
    return torch.round(b / deq - rowsum * float(input_offset)).to(torch.int32)


def int8_matmul_reference(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 product: x_q int8 [T, K] @ w_q int8 [N, K]^T -> int32 [T, N] (slow, for reference)."""
    return (x_q.to(torch.int64) @ w_q.to(torch.int64).t()).to(torch.int32)


_EXACT_K = 1024  # 1024 products of int8 stay within 2^24: an fp32 GEMM over that many columns is exact


def int8_matmul_exact(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x_q int8 [T, K] @ w_q int8 [N, K]^T as exact integers in fp64, at fp32 BLAS speed (K-chunks of 1024)."""
    out = torch.zeros(x_q.shape[0], w_q.shape[0], dtype=torch.float64, device=x_q.device)  # [T, N]
    for k in range(0, x_q.shape[1], _EXACT_K):
        out += x_q[:, k : k + _EXACT_K].float() @ w_q[:, k : k + _EXACT_K].float().t()
    return out


def static_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    quant_bias: torch.Tensor,
    deq: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
) -> torch.Tensor:
    """W8A8 runtime: y = ((x_q @ W_q^T) + quant_bias) * deq_scale in the dtype of x: [..., K] -> [..., N]."""
    x_q = quantize_static(x, input_scale, input_offset).reshape(-1, x.shape[-1])  # [T, K]
    acc = int8_matmul_exact(x_q, w_q) + quant_bias.double()  # [T, N]
    y = (acc * decode_deq_scale(deq).double()).to(x.dtype)
    return y.reshape(*x.shape[:-1], -1)


def dynamic_linear(
    x: torch.Tensor, w_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8_DYNAMIC runtime: y = (x_q @ W_q^T) * weight_scale * s_t + bias; scales rounded to x.dtype on load."""
    x_q, s_t = quantize_per_token(x.reshape(-1, x.shape[-1]))  # [T, K], [T, 1]
    w_s = weight_scale.to(x.dtype).double().reshape(1, -1)  # [1, N]
    y = int8_matmul_exact(x_q, w_q) * w_s * s_t.double()  # [T, N]
    if bias is not None:
        y = y + bias.to(x.dtype).double()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def weight_only_weight(
    w_q: torch.Tensor, weight_scale: torch.Tensor, weight_offset: torch.Tensor, model_dtype: torch.dtype
) -> torch.Tensor:
    """W8A16's weight as the runtime sees it: (w_q + weight_offset) * weight_scale with both held in the model
    dtype (vLLM-Ascend registers them so; npu_weight_quant_batchmatmul's antiquant form), rounded to it: [N, K]."""
    scale = weight_scale.to(model_dtype).float().reshape(-1, 1)  # [N, 1]
    offset = weight_offset.to(model_dtype).float().reshape(-1, 1)  # [N, 1]
    return ((w_q.float() + offset) * scale).to(model_dtype)


def weight_only_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_offset: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A16 runtime: y = x @ weight_only_weight(...)^T + bias, in x's (the model's) dtype: [..., K] -> [..., N]."""
    w = weight_only_weight(w_q, weight_scale, weight_offset, x.dtype).float()  # [N, K]
    b = None if bias is None else bias.to(x.dtype).float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)


# ---- int8 KV cache (C8): static per-channel scales over kv_heads * head_dim, keys after RoPE ----


def kv_cache_scale(amax: torch.Tensor) -> torch.Tensor:
    """Symmetric per-channel C8 scale from the calibration's max |k| (or |v|) per channel: fp32, same shape."""
    return _over_127(amax.float()).clamp(min=_TINY)


def kv_cache_runtime_params(
    scale: torch.Tensor, offset: torch.Tensor, model_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale, offset) as vLLM-Ascend holds them: cast to the model dtype, the reciprocal taken there;
    returned in fp32, each of the given shape."""
    scale_m = scale.to(model_dtype)
    return scale_m.float(), (1.0 / scale_m).float(), offset.to(model_dtype).float()


def quantize_kv(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Store into an int8 KV cache: clamp(round(x * (1 / scale) + offset)) in x's dtype; x [T, KVH, D], inv_scale /
    offset [KVH, D]. Returns int8 [T, KVH, D]."""
    x_q = torch.round(x * inv_scale.to(x.dtype) + offset.to(x.dtype))
    return torch.clamp(x_q, QMIN, QMAX).to(torch.int8)


def dequantize_kv(x_q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Read an int8 KV cache back: (x_q - offset) * scale in dtype; x_q [..., KVH, D], scale / offset [KVH, D]."""
    return (x_q.to(dtype) - offset.to(dtype)) * scale.to(dtype)
