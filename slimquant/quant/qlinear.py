"""One linear -> its ascend tensors (docs/FORMAT.md write order) and a module that runs them as the runtime does."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slimquant.format import primitives as P
from slimquant.format.schemes import FLOAT, W8A8, W8A16

Tensors = dict[str, tuple[torch.Tensor, str]]  # suffix -> (tensor, description type), in write order


def linear_tensors(
    w: torch.Tensor,
    bias: torch.Tensor | None,
    qtype: str,
    in_range: tuple[float, float] | None,
    dtype: torch.dtype,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Tensors:
    """Quantize w [N, K] (fp32, already smoothed) as qtype; in_range (min, max) of its input for W8A8. W8A16 and
    W8A8_DYNAMIC store the same tensors (weight, weight_scale, zero weight_offset).

    quantized: (w_q int8 [N, K], scale [N, 1]) rounded elsewhere (GPTQ); default: round to nearest.
    """
    if qtype == FLOAT:
        out = {"weight": (w.to(dtype), FLOAT)}
        return out | ({"bias": (bias.to(dtype), FLOAT)} if bias is not None else {})
    w_q, w_s = quantized if quantized is not None else P.quantize_weight(w)  # [N, K] int8, [N, 1] fp32
    out = {"weight": (w_q, qtype)}
    if bias is not None:
        out["bias"] = (bias.to(dtype), FLOAT)
    out["weight_scale"] = (w_s, qtype)
    out["weight_offset"] = (torch.zeros_like(w_s), qtype)
    if qtype == W8A8:
        out |= {k: (v, qtype) for k, v in _static_params(w_q, w_s, bias, in_range, dtype).items()}
    return out


def _static_params(w_q, w_s, bias, in_range, dtype) -> dict[str, torch.Tensor]:
    assert in_range is not None, "W8A8 needs the input range"
    scale, offset = P.static_activation_params(*in_range)
    input_scale = torch.tensor([scale], dtype=torch.float32, device=w_s.device)  # [1]
    input_offset = torch.tensor([offset], dtype=torch.float32, device=w_s.device)  # [1]
    deq = P.deq_scale(float(input_scale), w_s, dtype)  # [N]
    return {
        "input_scale": input_scale,
        "input_offset": input_offset,
        "quant_bias": P.quant_bias(bias, deq, w_q, offset),
        "deq_scale": deq,
    }


class SimLinear(nn.Module):
    """A linear that computes exactly what the runtime computes from the written tensors (fake-quant)."""

    def __init__(self, qtype: str, tensors: Tensors, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.dtype = qtype, dtype  # dtype: the model's, in which the runtime sees x and y
        self.t = {k: v for k, (v, _) in tensors.items()}

    def to_device(self, device: torch.device | str) -> SimLinear:
        """Move the held tensors (they are plain attributes, not parameters)."""
        self.t = {k: v.to(device) for k, v in self.t.items()}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N], in x's dtype
        return self._runtime(x.to(self.dtype)).to(x.dtype)

    def _runtime(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] in the model dtype
        t = self.t
        if self.qtype == FLOAT:
            b = t.get("bias")
            return F.linear(x.float(), t["weight"].float(), None if b is None else b.float()).to(x.dtype)
        if self.qtype == W8A8:
            return P.static_linear(x, t["weight"], t["quant_bias"], t["deq_scale"], t["input_scale"], t["input_offset"])
        if self.qtype == W8A16:
            return P.weight_only_linear(x, t["weight"], t["weight_scale"], t["weight_offset"], t.get("bias"))
        return P.dynamic_linear(x, t["weight"], t["weight_scale"], t.get("bias"))
