"""Routed experts one module per expert, as the checkpoint stores them (transformers 5 fuses them in 3D tensors).

On disk: mlp.experts.{e}.{gate,up,down}_proj.weight. transformers' Experts holds gate_up_proj [E, 2I, H] (gate rows
first) and down_proj [E, H, I]. The quantizer swaps the fused module for PerExpert, so that every expert linear
is an nn.Linear: loaded by name, observed by hooks (each sees exactly the tokens the router sends it), replaced by
a SimLinear and written per expert.
"""

from __future__ import annotations

import torch
from torch import nn


class PerExpert(nn.ModuleList):
    """Routed experts as a list of MLPs; forward matches transformers' fused Experts (same routing inputs)."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden: [T, H]; top_k_index, top_k_weights: [T, k] -> [T, H]
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)  # [n], [n]
            if tok.numel() == 0:
                continue
            y = expert(hidden[tok]) * top_k_weights[tok, pos, None]  # [n, H]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def unfuse_experts(layer: nn.Module, mlp_cls: type[nn.Module] | None, config) -> None:
    """Replace layer.mlp.experts (fused) by a PerExpert of mlp_cls(config, intermediate_size=I) MLPs, if the layer
    has them."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    if experts is None or isinstance(experts, PerExpert):
        return
    assert hasattr(experts, "gate_up_proj") and mlp_cls is not None, type(experts)
    size = experts.down_proj.shape[-1]  # I
    device = experts.gate_up_proj.device
    with torch.device(device):
        mlp.experts = PerExpert(
            [mlp_cls(config=config, intermediate_size=size) for _ in range(experts.gate_up_proj.shape[0])]
        )


def is_routed_expert(name: str) -> bool:
    """Whether a name relative to a decoder layer belongs to a routed expert (mlp.experts.E.*)."""
    return name.startswith("mlp.experts.")


def count_idle(ranges: dict, linears: tuple[str, ...]) -> int:
    """How many routed experts of one layer received no calibration token (their gate_proj saw no input)."""
    gates = [r for r in linears if r.startswith("mlp.experts.") and r.endswith(".gate_proj")]
    return sum(ranges[r].min is None for r in gates)
