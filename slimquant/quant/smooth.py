"""Anti-outlier smoothing folded into a producer (norm) and the linears that read it: exact re-parameterisation.

SmoothQuant: s = clamp(A_absmax^a / W_colmax^(1-a), min 1e-5) per input channel; norm.weight /= s and each
linear's columns *= s. Iterative (ModelSlim m4) first shifts each channel by (max+min)/2: the norm gains a
bias -shift/s and each linear's bias grows by W @ shift. A linear producer (up_proj before down_proj) takes
the scale in its output rows instead of a norm, and no shift.

alpha "auto" searches ALPHA_GRID per group: the alpha whose smoothed, quantized group (the runtime's math on a
sample of the group's calibration inputs) has the lowest summed relative output error against float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from slimquant.quant.modelslim import FLOAT
from slimquant.quant.observers import ChannelRange
from slimquant.quant.qlinear import SimLinear, linear_tensors

METHODS = ("none", "smoothquant", "iterative")
AUTO = "auto"
ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1
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


def check_alpha(alpha: float | str) -> float | str:
    """Validate an --alpha value: a migration strength in [0, 1] (0 keeps it on activations) or "auto" (per group)."""
    if isinstance(alpha, str) and alpha.strip().lower() == AUTO:
        return AUTO
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"--alpha must be a number in [0, 1] or 'auto', got {alpha!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1] or 'auto', got {alpha}")
    return value


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


Member = tuple[torch.Tensor, torch.Tensor | None, str]  # one linear of a group: weight [N, K], bias [N], qtype


def search_alpha(
    x: torch.Tensor, rng: ChannelRange, members: list[Member], method: str, dtype: torch.dtype, grid=ALPHA_GRID
) -> tuple[float, list[float]]:
    """The grid alpha with the lowest group_error on the input sample x [n, K] (first on ties), and every error."""
    weights = [w for w, _, _ in members]
    refs = [F.linear(x, w.float(), None if b is None else b.float()) for w, b, _ in members]  # [n, N_i] each
    errors = [group_error(x, rng, members, smoothing_factors(rng, weights, a, method), dtype, refs) for a in grid]
    best = min(range(len(grid)), key=errors.__getitem__)
    return grid[best], errors


def group_error(
    x: torch.Tensor,
    rng: ChannelRange,
    members: list[Member],
    sm: Smoothing,
    dtype: torch.dtype,
    refs: list[torch.Tensor] | None = None,
) -> float:
    """Sum over the quantized linears of ||y_q - y||^2 / ||y||^2: y float, y_q the runtime on smoothed x [n, K]."""
    shift = sm.shift if sm.shift is not None else torch.zeros_like(sm.scale)  # [K]
    xs = (x - shift) / sm.scale  # [n, K]
    in_range = rng.transformed(shift, sm.scale).tensor_range()  # static: per-tensor range of all smoothed tokens
    total = 0.0
    for j, (w, b, qtype) in enumerate(members):
        if qtype == FLOAT:
            continue
        ref = refs[j] if refs is not None else F.linear(x, w.float(), None if b is None else b.float())  # [n, N]
        ws, bs = smooth_linear(w, b, sm)
        y = SimLinear(qtype, linear_tensors(ws, bs, qtype, in_range, dtype), dtype)(xs)  # [n, N]
        total += float((y - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
    return total
