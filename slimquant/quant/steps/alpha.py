"""Alpha plug-ins: the migration strength of each smoothing group, fixed or searched on its calibration inputs."""

from __future__ import annotations

import torch

from slimquant.quant.observers import ChannelRange
from slimquant.quant.smooth import Member, search_alpha
from slimquant.quant.steps.smoothing import Smoother


class FixedAlpha:
    """One alpha in [0, 1] for every group (0 keeps the outliers on the activations)."""

    name = "fixed"
    sample_tokens = 0  # calibration tokens per group that choose() needs kept: none

    def __init__(self, value: float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1] or 'auto', got {value}")
        self.value = value

    def choose(self, sample: torch.Tensor | None, rng: ChannelRange, members: list[Member], smoother: Smoother,
               dtype: torch.dtype) -> float:  # fmt: skip
        """The group's alpha."""
        return self.value


class SearchedAlpha(FixedAlpha):
    """Per group, the alpha whose smoothed, quantized group (the runtime's math on a sample of its calibration
    inputs) has the lowest summed relative output error against float (quant/smooth.py: search_alpha)."""

    name = "auto"
    sample_tokens = 512

    def __init__(self):
        self.value = float("nan")

    def choose(self, sample, rng, members, smoother, dtype):
        return search_alpha(sample, rng, members, smoother.factors, dtype)[0]
