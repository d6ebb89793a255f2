"""RMSNorm with an optional bias (the anti-outlier shift of docs/FORMAT.md) and a fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps
from slimquant.kernels.int8_input import InputQuant, Int8Rows


class RMSNorm(nn.Module):
    """norm(x) = x / rms(x) * weight (+ bias), computed in fp32 like transformers."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

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
        """norm(x) of x [T, D] or [T, heads, D] (per-head norms: Qwen3's q/k), or with a residual [T, D]:
        (norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.bias, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.bias, self.eps)

    def for_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, quant: InputQuant | None
    ) -> tuple[torch.Tensor | Int8Rows, torch.Tensor]:
        """(norm(x + residual), x + residual) of x [T, D] (residual None: x itself) for the linear that alone reads
        the norm: quantized as its input_quant says where the backend fuses that, else float."""
        return self.ops.add_rms_norm_quant(x, residual, self.weight, self.bias, self.eps, quant)
