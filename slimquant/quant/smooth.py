"""Anti-outlier smoothing's math, folded into a producer (norm) and the linears that read it: exact
re-parameterisation (the plug-ins that choose it: quant/steps/smoothing.py, quant/steps/alpha.py).

SmoothQuant: s = clamp(A_absmax^a / W_colmax^(1-a), min 1e-5) per input channel; norm.weight /= s and each
linear's columns *= s. Iterative (ModelSlim m4) first shifts each channel by (max+min)/2: the norm gains a
bias -shift/s and each linear's bias grows by W @ shift. A linear producer (up_proj before down_proj) takes
the scale in its output rows instead of a norm, and no shift.

alpha "auto" searches per group: ALPHA_GRID (0, 0.1, ..., 1), then the best +- 0.05; it keeps the alpha whose
smoothed, quantized group (the runtime's math on a sample of the group's calibration inputs) has the lowest
summed relative output error against float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from slimquant.format.schemes import FLOAT
from slimquant.quant.observers import ChannelRange
from slimquant.quant.qlinear import SimLinear, linear_tensors

ALPHA_GRID = tuple(i / 10 for i in range(11))  # 0, 0.1, ..., 1
ALPHA_REFINE = 0.05  # then the best grid alpha +- this
_MIN_SCALE = 1e-5


@dataclass
class Smoothing:
    """Per-input-channel scale [K] (and shift [K] for the iterative method)."""

    scale: torch.Tensor
    shift: torch.Tensor | None = None


def smoothing_factors(rng: ChannelRange, weights: list[torch.Tensor], alpha: float, shift: bool) -> Smoothing:
    """The scale (and, with shift, the centring shift) for one norm -> linears group from its input range and
    weights [N_i, K]."""
    assert 0.0 <= alpha <= 1.0, alpha
    shift = (rng.max + rng.min) / 2 if shift else None  # [K]
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


Factors = Callable[[ChannelRange, list[torch.Tensor], float], Smoothing]  # a smoother's (rng, weights, alpha) -> ...


def search_alpha(
    x: torch.Tensor,
    rng: ChannelRange,
    members: list[Member],
    factors: Factors,
    dtype: torch.dtype,
    grid: tuple[float, ...] = ALPHA_GRID,
    refine: float = ALPHA_REFINE,
) -> tuple[float, dict[float, float]]:
    """The alpha with the lowest group_error on the input sample x [n, K] (smallest on ties), and every error.

    Scores every grid alpha, then (refine > 0) the best one +- refine within [0, 1].
    """
    weights = [w for w, _, _ in members]
    refs = [F.linear(x, w.float(), None if b is None else b.float()) for w, b, _ in members]  # [n, N_i] each
    errors: dict[float, float] = {}

    def score(alpha: float) -> None:
        if alpha not in errors and 0.0 <= alpha <= 1.0:
            errors[alpha] = group_error(x, rng, members, factors(rng, weights, alpha), dtype, refs)

    for alpha in grid:
        score(alpha)
    if refine > 0:
        best = min(sorted(errors), key=errors.__getitem__)
        for alpha in (best - refine, best + refine):
            score(round(alpha, 6))
    return min(sorted(errors), key=errors.__getitem__), errors


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
    for qtype in sorted({q for _, _, q in members} - {FLOAT}):
        # the linears of one type read the same x: one runtime call on their rows stacked (per-row quantization)
        idx = [j for j, m in enumerate(members) if m[2] == qtype]
        smoothed = [smooth_linear(members[j][0], members[j][1], sm) for j in idx]
        w = torch.cat([ws for ws, _ in smoothed])  # [sum N_j, K]
        b = torch.cat([bs if bs is not None else ws.new_zeros(ws.shape[0]) for ws, bs in smoothed])  # [sum N_j]
        bias = b if any(bs is not None for _, bs in smoothed) else None
        y = SimLinear(qtype, linear_tensors(w, bias, qtype, in_range, dtype), dtype)(xs)  # [n, sum N_j]
        for j, y_j in zip(idx, y.split([ws.shape[0] for ws, _ in smoothed], dim=1), strict=True):
            w_j, b_j, _ = members[j]
            ref = refs[j] if refs is not None else F.linear(x, w_j.float(), None if b_j is None else b_j.float())
            total += float((y_j - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))
    return total
