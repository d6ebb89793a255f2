"""Rounding plug-ins: how a linear's float weight becomes int8 at the same per-channel scale (absmax / 127), so the
format and the engine do not change."""

from __future__ import annotations

import torch

from slimquant.format import primitives as P
from slimquant.quant.gptq import gptq_quantize


class NearestRounding:
    """Round to nearest (half to even)."""

    name = "nearest"
    needs_hessian = False  # whether round() wants the second moment of the linear's input
    skip: tuple[str, ...] = ()  # linears (globs, relative to the layer) that round to nearest whatever the rounder

    def round(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """w [N, K] fp32 -> (w_q int8 [N, K], scale fp32 [N, 1])."""
        return P.quantize_weight(w)


class GPTQRounding(NearestRounding):
    """GPTQ (quant/gptq.py): each column's rounding error spread over the columns not yet rounded, through the
    inverse Hessian of the linear's calibration inputs; round to nearest where the input saw no token."""

    name = "gptq"
    needs_hessian = True
    skip = ("mlp.experts.*",)  # routed experts: one K x K Hessian per expert is too much

    def round(self, w, hessian=None):
        return super().round(w) if hessian is None else gptq_quantize(w, hessian.to(w.device))
