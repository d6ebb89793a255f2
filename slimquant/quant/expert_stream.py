"""Routed experts a group at a time: a MoE layer is calibrated and quantized with only a bounded group of its
experts in memory, so that memory does not grow with their number (Kimi-K2: 384 per layer, 70 GB in fp32).

The layer runs with StreamedExperts in place of its experts. Its forward records what the router sends (the MoE
input rows, each token's experts and weights) and returns zeros, or replays routed outputs computed beforehand.
quantize_layer runs the float layer once (recording), quantizes the rest of the layer, runs the quantized layer
once (recording again), then for each group: loads its float weights, observes each expert on its tokens of the
float run, quantizes and writes it, adds its outputs on the quantized run's tokens, and frees it. A last run
replays the summed outputs. Every expert sees exactly the tokens it sees when the whole layer is in memory, and
the outputs are summed in the same order (expert by expert, per batch), so the result is the same bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from slimquant.quant.memory import return_freed_memory
from slimquant.quant.moe import PerExpert

EXPERT_GROUP_BYTES = 2**30  # float expert weights (compute dtype) held at once
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # MoE input [T, H], expert ids [T, k], weights [T, k]


class StreamedExperts(PerExpert):
    """The routed experts of a layer, all on the meta device but the group being worked on."""

    def __init__(self, experts: PerExpert):
        super().__init__(list(experts))
        self._template = (copy.deepcopy(experts[0]).to("meta"),)  # an expert without storage (not a submodule)
        self.recorded: list[Batch] = []
        self.replay: list[torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> the replayed routed output [T, H], or (recording) zeros."""
        if self.replay is not None:
            return self.replay.pop(0)
        self.recorded.append((hidden, top_k_index, top_k_weights))
        return torch.zeros_like(hidden)

    def take_recorded(self) -> list[Batch]:
        """The batches recorded since the last call."""
        out, self.recorded = self.recorded, []
        return out

    def groups(self, bytes_per_expert: int, budget: int = EXPERT_GROUP_BYTES) -> Iterator[range]:
        """Expert ids in consecutive groups of at most budget bytes (at least one expert each)."""
        size = max(1, budget // max(bytes_per_expert, 1))
        for start in range(0, len(self), size):
            yield range(start, min(start + size, len(self)))

    @property
    def template(self) -> nn.Module:
        """An expert on the meta device."""
        return self._template[0]

    def load(self, e: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """Expert e with these float weights (relative names), in place of its meta module."""
        expert = copy.deepcopy(self.template)
        expert.load_state_dict(state, strict=True, assign=True)
        self[e] = expert.eval()
        return expert

    def release(self, experts: range) -> None:
        """Put the group's experts back on the meta device, and their memory back to the OS (else the heap, cut
        up by groups of large tensors, grows with the number of groups)."""
        for e in experts:
            self[e] = copy.deepcopy(self.template)
        return_freed_memory()

    def run(self, experts: range, batches: list[Batch], outputs: list[torch.Tensor] | None = None) -> None:
        """Run the experts over their tokens of each batch, adding their weighted outputs into outputs [T, H] per
        batch where given (expert by expert, as PerExpert.forward sums them)."""
        for b, (hidden, index, weights) in enumerate(batches):
            for e in experts:
                tok, pos = torch.where(index == e)  # [n], [n]
                if tok.numel() == 0:
                    continue
                y = self[e](hidden[tok])  # [n, H]
                if outputs is not None:
                    outputs[b].index_add_(0, tok, (y * weights[tok, pos, None]).to(outputs[b].dtype))


def streamed_experts(layer: nn.Module) -> StreamedExperts | None:
    """Swap the layer's routed experts (PerExpert, on the meta device) for StreamedExperts; None for a dense layer."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    if not isinstance(experts, PerExpert):
        return None
    mlp.experts = StreamedExperts(experts)
    return mlp.experts


def expert_state(fetch: Callable[[str], torch.Tensor], e: int, names: list[str]) -> dict[str, torch.Tensor]:
    """Expert e's float tensors, relative to the expert, from the checkpoint (names: relative to an expert)."""
    return {n: fetch(f"mlp.experts.{e}.{n}") for n in names}
