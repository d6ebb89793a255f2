"""int8 compute kernels the quant methods call: GEMM and activation quantization.

Each op has a pure-torch reference (the definition) and a fast path chosen by device; both give identical
results. A later task swaps in oneDNN/AMX or compiled kernels behind these same functions.
"""

from __future__ import annotations

import torch

from slimquant.quant.primitives import QMAX, QMIN, int8_matmul_reference
from slimquant.quant.primitives import quantize_per_token as quantize_per_token  # the fast path too, for now


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
