"""The per-step batch description that the engine sets and attention layers read (nano-vllm style).

One step runs any mix of sequences; sequence i contributes query_lens[i] new tokens (a prefill chunk or
one decode token) on top of context_lens[i] - query_lens[i] tokens already in its paged KV cache.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    """Batch layout of one forward step; tokens of all sequences are packed along one axis T."""

    query_lens: list[int]  # [B] new tokens per sequence, sum = T
    context_lens: list[int]  # [B] cached + new tokens per sequence
    slot_mapping: torch.Tensor  # [T] int64 flat KV slot (block_id * block_size + offset) for each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32 block ids, -1 padded
    block_size: int
    device_context_lens: torch.Tensor | None = None  # [B] int32 on the model's device in a CUDA-graph step

    def to(self, device: torch.device) -> ForwardContext:
        """This context with its tensors on device (itself where they are there already)."""
        if self.block_tables.device == device:
            return self
        lens = None if self.device_context_lens is None else self.device_context_lens.to(device)
        moved = (self.slot_mapping.to(device), self.block_tables.to(device), lens)
        return dataclasses.replace(self, slot_mapping=moved[0], block_tables=moved[1], device_context_lens=moved[2])

    @functools.cached_property
    def context_lens_tensor(self) -> torch.Tensor:
        """context_lens as int32 [B] on the CPU (made once per step, for the native attention kernel)."""
        return torch.tensor(self.context_lens, dtype=torch.int32)

    @functools.cached_property
    def lens_on_device(self) -> torch.Tensor:
        """context_lens as int32 [B] on the block tables' device: the graph's buffer in a CUDA-graph step, else
        one copy per step, shared by every layer."""
        if self.device_context_lens is not None:
            return self.device_context_lens
        return self.context_lens_tensor.to(self.block_tables.device)

    @functools.cached_property
    def token_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention row per token, for the native decode kernels: (block tables [T, W] on the CPU, context
        lengths int32 [T]). Token j of a chunk of q new tokens over L attends to the first L - q + j + 1
        positions (in a decode step: the rows as they are)."""
        if self.is_decode:
            return self.block_tables, self.context_lens_tensor
        seq = torch.repeat_interleave(torch.arange(len(self.query_lens)), torch.tensor(self.query_lens))  # [T]
        lens = [n - q + j + 1 for q, n in zip(self.query_lens, self.context_lens, strict=True) for j in range(q)]
        return self.block_tables[seq.to(self.block_tables.device)], torch.tensor(lens, dtype=torch.int32)

    @property
    def graph_step(self) -> bool:
        """True in a CUDA-graph step (or its CPU stand-in in tests): shapes fixed, no host lengths to read."""
        return self.device_context_lens is not None

    @property
    def is_decode(self) -> bool:
        """True when every sequence adds exactly one token."""
        return all(q == 1 for q in self.query_lens)


_CONTEXT: ForwardContext | None = None


def get_context() -> ForwardContext:
    """The context of the step being run; attention layers call this."""
    assert _CONTEXT is not None, "attention run outside of a forward step (no ForwardContext set)"
    return _CONTEXT


@contextmanager
def forward_context(ctx: ForwardContext):
    """Make ctx current for the duration of one model forward."""
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous
