"""A backend runs a model's steps with one set of kernels, picked once when the model is loaded.

It supplies the ops every layer calls (`ops`: TorchOps or a faster set that computes the same numbers), owns the
whole step (`forward`: per op, CUDA-graph replays, or one native call for all layers), and the LM head as the
sampler uses it (`head`). Whatever it decided at load, and every part that could not take its fast path, it
says once in `notes` (logged by the loader, printed by `slimquant bench`).
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.backends.cuda_graphs import CudaGraphDecoder, graphs_supported
from slimquant.backends.torch_ops import TorchOps
from slimquant.layers.context import ForwardContext, forward_context


class Backend:
    """The torch-reference backend: every op in plain torch, layer by layer; the base of the others."""

    name = "torch-reference"

    def __init__(self, ops: TorchOps | None = None, graphs: bool = False):
        self.ops = ops or TorchOps()
        self.graphs_wanted = graphs  # decode steps as CUDA-graph replays where the model allows
        self.graphs: CudaGraphDecoder | None = None
        self.notes: list[str] = []

    def describe(self) -> str:
        """One line: the backend, its ops, and what it noted at load."""
        return "; ".join([f"{self.name} (ops: {self.ops.name})", *self.notes])

    def bind(self, model: nn.Module) -> None:
        """Give every layer that calls ops this backend's (before the weights are loaded and packed)."""
        for module in model.modules():
            if hasattr(module, "ops"):
                module.ops = self.ops

    def prepare(self, model: nn.Module) -> None:
        """After loading: build whatever the step needs (the base needs nothing)."""

    def scratch_blocks(self, model: nn.Module) -> int:
        """KV blocks the step needs beyond the sequences' (CUDA graphs: one for their padding rows)."""
        return int(self.graphs_wanted and graphs_supported(model))

    def start(self, model: nn.Module, max_num_seqs: int, max_blocks: int, block_size: int, scratch_block: int) -> None:
        """After the KV cache is allocated: set up graph replays where wanted (their padding writes scratch_block)."""
        if self.scratch_blocks(model):
            self.graphs = CudaGraphDecoder(model, max_num_seqs, max_blocks, block_size, scratch_block)
        elif self.graphs_wanted:
            self.notes.append("decode runs eagerly: the model's forward needs host values (MoE experts run one by one)")

    def forward(
        self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """One step: input_ids, positions [T] -> hidden [T, H] (a graph replay where one fits, else per op)."""
        if self.graphs is not None and (hidden := self.graphs.run(input_ids, positions, ctx)) is not None:
            return hidden
        with forward_context(ctx):
            return model(input_ids, positions)

    def head(self, model: nn.Module) -> LogitsHead:
        """The model's LM head as the sampler uses it."""
        return LogitsHead(model)


class LogitsHead:
    """A model's LM head for the sampler: full logits, each row's argmax, or each row's top-k candidates."""

    def __init__(self, model: nn.Module):
        self.model = model

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, V]."""
        return self.model.compute_logits(hidden)

    def argmax(self, hidden: torch.Tensor) -> list[int]:
        """Each row's argmax token of logits(hidden), ties to the first index."""
        return self.logits(hidden).argmax(dim=-1).tolist()

    def top_k(self, hidden: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, C], logits [N, C]): rows of logits(hidden) that include each row's top_k largest, with their
        values; sampling among them draws what sampling over all V would. Here: all V rows."""
        logits = self.logits(hidden)  # [N, V]
        ids = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        return ids, logits

    def screens(self, top_k: int | None = None) -> bool:
        """Whether argmax (top_k None) or top_k(., top_k) reads less than the whole head (else the sampler
        computes full logits once for everything it needs)."""
        return False

    def argmax_bytes(self) -> int | None:
        """Bytes of the head an argmax reads where that is less than the float weight (a screen); else None."""
        return None

    def screens_locally(self) -> bool:
        """Whether local_best screens this rank's part of a head split over ranks (the same answer on every rank)."""
        return False

    def local_best(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a head split over ranks: each row's argmax id among this rank's rows [N] and its exact logit [N]
        (ties to the first id), from a screen; None where the screen does not apply to these rows."""
        return None
