"""Routed experts a group at a time: a MoE layer is calibrated and quantized with only a bounded group of its
experts in memory, so that memory does not grow with their number (Kimi-K2: 384 per layer, 70 GB in fp32).

The layer runs with StreamedExperts in place of its experts. Its forward records what the router sends (the MoE
input rows, each token's experts and weights) and returns zeros, or replays routed outputs computed beforehand.
quantize_layer runs the float layer once (recording), quantizes the rest of the layer, runs the quantized layer
once (recording again), then for each group: loads its float weights, observes each expert on its tokens of the
float run, quantizes and writes it, adds its outputs on the quantized run's tokens, and frees it. A last run
replays the summed outputs. Every expert sees exactly the tokens it sees when the whole layer is in memory, and
the outputs are summed in the same order (expert by expert, per batch), so the result is the same bytes. What is
recorded and replayed is held in bounded memory (quant/activations.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from slimquant.quant.activations import Activations
from slimquant.quant.memory import return_freed_memory
from slimquant.quant.moe import PerExpert

EXPERT_GROUP_BYTES = 2**30  # float expert weights (compute dtype) held at once


class StreamedExperts(PerExpert):
    """The routed experts of a layer, all on the meta device but the group being worked on."""

    def __init__(self, experts: PerExpert, new_store: Callable[[], Activations]):
        super().__init__(list(experts))
        self._template = (copy.deepcopy(experts[0]).to("meta"),)  # an expert without storage (not a submodule)
        self._new_store = new_store
        self.recorded = new_store()  # per forward: (MoE input [T, H], expert ids [T, k], weights [T, k])
        self.replay: Activations | None = None  # routed outputs [T, H], one per forward, in order
        self._replayed = 0

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> the replayed routed output [T, H], or (recording) zeros."""
        if self.replay is not None:
            self._replayed += 1
            return self.replay[self._replayed - 1]
        self.recorded.append((hidden, top_k_index, top_k_weights))
        return torch.zeros_like(hidden)

    def take_recorded(self) -> Activations:
        """The batches recorded since the last call."""
        out, self.recorded = self.recorded, self._new_store()
        return out

    def end_replay(self) -> None:
        """Every replayed output was used: release them."""
        assert self.replay is not None and self._replayed == len(self.replay), (self._replayed, self.replay)
        self.replay.release()
        self.replay, self._replayed = None, 0

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

    def run(self, experts: range, batches: Activations, outputs: Activations | None = None) -> None:
        """Run the experts over their tokens of each batch, adding their weighted outputs into outputs [T, H] per
        batch where given (expert by expert, as PerExpert.forward sums them)."""
        for b, (hidden, index, weights) in enumerate(batches):
            out = None if outputs is None else outputs[b]  # [T, H]
            for e in experts:
                tok, pos = torch.where(index == e)  # [n], [n]
                if tok.numel() == 0:
                    continue
                y = self[e](hidden[tok])  # [n, H]
                if out is not None:
                    out.index_add_(0, tok, (y * weights[tok, pos, None]).to(out.dtype))
            if outputs is not None:
                outputs[b] = out


def streamed_experts(layer: nn.Module, new_store: Callable[[], Activations]) -> StreamedExperts | None:
    """Swap the layer's routed experts (PerExpert, on the meta device) for StreamedExperts recording into stores
    new_store() makes; None for a dense layer."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    if not isinstance(experts, PerExpert):
        return None
    mlp.experts = StreamedExperts(experts, new_store)
    return mlp.experts
