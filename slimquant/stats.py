"""Statistics of paired measurements: a 95% interval of a relative change from per-window mean NLLs."""

from __future__ import annotations

import math

import torch

# Student's t 0.975 quantiles for 1 .. 30 degrees of freedom (beyond: the normal's 1.96)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def change_interval(base: torch.Tensor, other: torch.Tensor) -> tuple[float, float] | None:
    """95% interval of the relative perplexity change (other / base - 1) from per-window mean NLLs [W] of two
    models on the same windows (paired: the windows' own difficulty cancels); None with fewer than 2 windows."""
    diff = (other - base).double()  # [W]
    n = diff.numel()
    if n < 2:
        return None
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * diff.std().item() / math.sqrt(n)
    return math.exp(diff.mean().item() - half) - 1, math.exp(diff.mean().item() + half) - 1
