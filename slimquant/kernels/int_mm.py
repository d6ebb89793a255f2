"""Exact int8 x int8 -> int32 products in plain torch: cuBLASLt's torch._int_mm on CUDA, fp32 K-chunks elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXACT_K = 1024  # 1024 * 128 * 128 = 2^24: fp32 sums of this many int8 products are exact
_CUDA_MIN_ROWS = 24  # torch._int_mm on CUDA needs more than 16 rows; a multiple of 8 keeps cuBLASLt aligned


def exact_float_mm(x_q: torch.Tensor, w_kn: torch.Tensor) -> torch.Tensor:
    """x_q int8 [T, K] @ w_kn (int8 values as fp32 [K, N]) in K-chunks of 1024, each partial sum exact -> int32."""
    x = x_q.float()  # [T, K]
    out = None
    for k in range(0, x.shape[1], EXACT_K):
        part = (x[:, k : k + EXACT_K] @ w_kn[k : k + EXACT_K]).to(torch.int32)  # [T, N]
        out = part if out is None else out + part
    return out


def cuda_gemm_rows(t: int) -> int:
    """Rows to give torch._int_mm on CUDA for t tokens."""
    return max(-(-t // 8) * 8, _CUDA_MIN_ROWS)


def on_cublas_grid(w_q: torch.Tensor) -> bool:
    """Whether int8 weight [N, K] fits cuBLASLt's int8 GEMM (torch._int_mm): N and K multiples of 8."""
    return w_q.shape[-1] % 8 == 0 and w_q.shape[-2] % 8 == 0


def cuda_int8_mm(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x_q int8 [T, K] @ w_q int8 [N, K]^T -> int32 [T, N] with cuBLASLt (torch._int_mm), rows zero-padded to its
    minimum; K or N off its grid of 8 multiply in exact fp32 K-chunks instead (CUDA has no int64 matmul)."""
    t = x_q.shape[0]
    if not on_cublas_grid(w_q):
        return exact_float_mm(x_q, w_q.float().t())
    rows = cuda_gemm_rows(t)
    x_pad = F.pad(x_q, (0, 0, 0, rows - t)) if rows != t else x_q.contiguous()  # [rows, K]
    return torch._int_mm(x_pad, w_q.t())[:t]  # [T, N]
