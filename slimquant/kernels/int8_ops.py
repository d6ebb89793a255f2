"""int8 compute kernels the quant methods call: GEMM and activation quantization.

Each op has a pure-torch reference (the definition) and a fast path chosen by device; both give identical
results. A later task swaps in oneDNN/AMX or compiled kernels behind these same functions.

GEMM on CPU: torch._int_mm has no vectorised kernel on CPUs without VNNI/AMX (25-1000x slower than fp32
BLAS here, AVX2 EPYC). Until a native int8 kernel lands, `pack_weight` keeps the int8 weights as an fp32
[K, N] copy and `int8_mm_packed` multiplies in K-chunks of at most 1024: every partial sum of int8 x int8
products is an integer below 2^24, so fp32 holds it exactly and the int32 result is bit-exact. The cost is
4 bytes of memory per weight at run time (the checkpoint stays int8).
"""

from __future__ import annotations

import torch

from slimquant.quant.primitives import QMAX, QMIN, int8_matmul_reference
from slimquant.quant.primitives import quantize_per_token as quantize_per_token  # the fast path too, for now

_EXACT_K = 1024  # 1024 * 128 * 128 = 2^24: fp32 sums of this many int8 products are exact


def pack_weight(w_q: torch.Tensor) -> torch.Tensor:
    """Runtime form of an int8 weight [N, K]: int8 [N, K] on CUDA, exact fp32 [K, N] on CPU."""
    if w_q.device.type == "cpu":
        return w_q.float().t().contiguous()
    return w_q


def int8_mm_packed(x_q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact int32 product x_q int8 [T, K] @ W^T for a weight made by pack_weight -> int32 [T, N]."""
    if packed.dtype == torch.int8:
        return int8_mm(x_q, packed)
    x = x_q.float()  # [T, K]
    out = None
    for k in range(0, x.shape[1], _EXACT_K):
        part = (x[:, k : k + _EXACT_K] @ packed[k : k + _EXACT_K]).to(torch.int32)  # [T, N], exact
        out = part if out is None else out + part
    return out


def int8_mm(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 product x_q int8 [T, K] @ w_q int8 [N, K]^T -> int32 [T, N]."""
    if _int_mm_supported(x_q, w_q):
        return torch._int_mm(x_q, w_q.t())
    return int8_matmul_reference(x_q, w_q)


def _int_mm_supported(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """torch._int_mm is exact on CPU at any shape; CUDA needs T > 16 and K, N multiples of 8."""
    if x_q.device.type == "cpu":
        return True
    if x_q.device.type == "cuda":
        t, k = x_q.shape
        return t > 16 and k % 8 == 0 and w_q.shape[0] % 8 == 0
    return False


def quantize_static(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8: clamp(round(x * inv_scale + offset)); x [T, K], inv_scale/offset in x's dtype."""
    return torch.clamp(torch.round(x * inv_scale + offset), QMIN, QMAX).to(torch.int8)
