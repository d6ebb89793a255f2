"""Anti-outlier smoothing plug-ins: how a producer (a norm, or up_proj before down_proj) and the linears that read
its output trade a per-channel scale (quant/smooth.py holds the math they share)."""

from __future__ import annotations

import torch

from slimquant.quant.observers import ChannelRange
from slimquant.quant.smooth import Smoothing, smoothing_factors


class Smoother:
    """None: the activations keep their outliers (no smoothing pairs are formed)."""

    name = "none"
    active = False  # whether the run forms smoothing pairs at all
    shifts = False  # whether a norm producer's linears gain a bias (W @ shift)

    def factors(self, rng: ChannelRange, weights: list[torch.Tensor], alpha: float) -> Smoothing:
        """The scale (and shift) of one producer -> linears group from its input range and weights [N_i, K]."""
        raise NotImplementedError(f"{self.name} forms no smoothing groups")

    def for_linear_producer(self) -> Smoother:
        """The smoothing a linear producer takes: it absorbs a scale in its output rows, never a shift."""
        return self


class SmoothQuant(Smoother):
    """SmoothQuant: s = A_absmax^a / W_colmax^(1-a) per input channel; producer / s, linears' columns * s."""

    name = "smoothquant"
    active = True

    def factors(self, rng, weights, alpha):
        return smoothing_factors(rng, weights, alpha, shift=False)


class IterativeSmooth(SmoothQuant):
    """ModelSlim's iterative smooth (m4): each channel first centred by (max + min) / 2, which a norm producer takes
    as a bias and the linears' biases as W @ shift."""

    name = "iterative"
    shifts = True

    def factors(self, rng, weights, alpha):
        return smoothing_factors(rng, weights, alpha, shift=True)

    def for_linear_producer(self) -> Smoother:
        return SmoothQuant()
