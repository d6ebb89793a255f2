"""Activation statistics of linear inputs: per-channel min and max over every calibration token."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class ChannelRange:
    """Running per-input-channel min / max of one linear's input."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None  # [K] fp32
        self.max: torch.Tensor | None = None  # [K] fp32

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch x: [..., K]."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        lo, hi = x.amin(dim=0), x.amax(dim=0)  # [K]
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def absmax(self) -> torch.Tensor:
        """Per-channel max |x|: [K]."""
        return torch.maximum(self.min.abs(), self.max.abs())

    def transformed(self, shift: torch.Tensor, scale: torch.Tensor) -> ChannelRange:
        """The range of (x - shift) / scale per channel (scale > 0): exact for a per-channel affine map."""
        out = ChannelRange()
        out.min, out.max = (self.min - shift) / scale, (self.max - shift) / scale
        return out

    def tensor_range(self) -> tuple[float, float]:
        """Per-tensor (min, max)."""
        return float(self.min.min()), float(self.max.max())


@contextmanager
def observe_inputs(layer: nn.Module, names: list[str]):
    """Within the block, every forward of the named linears records its input; yields {name: ChannelRange}."""
    ranges = {n: ChannelRange() for n in names}
    hooks = [
        layer.get_submodule(n).register_forward_pre_hook(lambda _m, args, r=ranges[n]: r.update(args[0])) for n in names
    ]
    try:
        yield ranges
    finally:
        for h in hooks:
            h.remove()
