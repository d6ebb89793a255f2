"""RMSNorm with an optional bias (the anti-outlier shift of docs/FORMAT.md) and a fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from slimquant import kernels


class RMSNorm(nn.Module):
    """norm(x) = x / rms(x) * weight (+ bias), computed in fp32 like transformers."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        # The bias is zero unless the checkpoint has one: not every norm is shifted.
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype), requires_grad=False) if bias else None
        if self.bias is not None:
            self.bias.optional = True

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if x.dim() == 3 and residual is None:  # per-head norms (Qwen3's q/k): x [T, heads, D]
            fused = kernels.rms_norm_heads(x, self.weight, self.bias, self.eps)
            return fused if fused is not None else self._norm(x)
        fused = kernels.add_rms_norm(x, residual, self.weight, self.bias, self.eps)  # native, fp32 CPU only
        if fused is not None:
            return fused if residual is not None else fused[0]
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        return out if self.bias is None else out + self.bias
