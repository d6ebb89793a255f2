"""Gated activations of fused gate_up projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimquant import kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up]: [T, 2I] -> [T, I]."""
    fused = kernels.silu_and_mul(x) if x.dim() == 2 else None  # native, fp32 CPU only
    if fused is not None:
        return fused
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
