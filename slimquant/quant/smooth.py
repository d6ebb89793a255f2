"""Anti-outlier smoothing folded into a producer (norm) and the linears that read it: exact re-parameterisation.

SmoothQuant: s = clamp(A_absmax^a / W_colmax^(1-a), min 1e-5) per input channel; norm.weight /= s and each
linear's columns *= s. Iterative (ModelSlim m4) first shifts each channel by (max+min)/2: the norm gains a
bias -shift/s and each linear's bias grows by W @ shift. A linear producer (up_proj before down_proj) takes
the scale in its output rows instead of a norm, and no shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.quant.observers import ChannelRange

METHODS = ("none", "smoothquant", "iterative")
_MIN_SCALE = 1e-5


@dataclass
class Smoothing:
    """Per-input-channel scale [K] (and shift [K] for the iterative method)."""

    scale: torch.Tensor
    shift: torch.Tensor | None = None


def parse_method(name: str) -> str:
    """Validate an --anti-outlier value."""
    if name not in METHODS:
        raise ValueError(f"unknown anti-outlier method {name!r}; choose one of: {', '.join(METHODS)}")
    return name


def check_alpha(alpha: float) -> float:
    """Validate an --alpha value (migration strength, 0 = all on activations kept, 1 = all moved to weights)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    return alpha


def smoothing_factors(rng: ChannelRange, weights: list[torch.Tensor], alpha: float, method: str) -> Smoothing:
    """The scale (and shift) for one norm -> linears group from its input range and weights [N_i, K]."""
    assert 0.0 <= alpha <= 1.0, alpha
    shift = (rng.max + rng.min) / 2 if method == "iterative" else None  # [K]
    a_max = (rng.max - rng.min) / 2 if shift is not None else rng.absmax()  # [K]
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # [K]
    scale = (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=_MIN_SCALE)  # [K]
    dead = (a_max <= 0) | (w_max <= 0) | ~torch.isfinite(scale)  # channels with nothing to balance
    return Smoothing(torch.where(dead, torch.ones_like(scale), scale), shift)


def smooth_norm(norm_w: torch.Tensor, sm: Smoothing) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Norm weight [K] / s, and its new bias -shift / s (None without shift); fp32."""
    w = norm_w.float() / sm.scale
    return w, None if sm.shift is None else -sm.shift / sm.scale


def smooth_linear(
    w: torch.Tensor, bias: torch.Tensor | None, sm: Smoothing
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight [N, K] with columns * s, and bias [N] + W @ shift (created if absent); fp32."""
    w = w.float()
    if sm.shift is not None:
        extra = w @ sm.shift  # [N]
        bias = extra if bias is None else bias.float() + extra
    return w * sm.scale[None, :], None if bias is None else bias.float()


def smooth_producer_linear(
    w: torch.Tensor, bias: torch.Tensor | None, sm: Smoothing
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear whose output feeds the smoothed linears: rows [N, K] / s and bias [N] / s; fp32."""
    assert sm.shift is None, "a linear producer cannot absorb a shift"
    return w.float() / sm.scale[:, None], None if bias is None else bias.float() / sm.scale
