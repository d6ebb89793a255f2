"""What an int8 linear asks of the op before it: its input quantization (InputQuant), and the quantized
activations that op hands over (Int8Rows) where the backend fuses the quantization into it (cuda-triton)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputQuant:
    """How an int8 linear quantizes its input: per token (inv_scale None: W8A8_DYNAMIC) or static with inv_scale /
    offset [1] in the activations' dtype (W8A8)."""

    inv_scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None


PER_TOKEN = InputQuant()


@dataclass(frozen=True)
class Int8Rows:
    """Activations [T, K] quantized for an int8 linear: q int8 [R >= T, K] (its first T rows), per-token scales
    fp32 [T] (W8A8_DYNAMIC) or None (W8A8: the linear's static scale), dtype: the float dtype they came in (the
    linear's output dtype)."""

    q: torch.Tensor
    scale: torch.Tensor | None
    t: int
    dtype: torch.dtype
