"""CUDA graphs for decode steps (vLLM's default on GPUs).

A small model's decode step is hundreds of short kernels whose launch overhead outweighs their work; replaying
a captured graph launches them all at once. One graph per (batch bucket, block-table width bucket), captured on
first use into one shared memory pool. Inputs live in static buffers: a batch is padded up to its bucket with
rows that write a scratch KV block and attend to one token of it, and attention reads the context lengths from
a device tensor over the bucket's fixed number of blocks (ForwardContext.device_context_lens).

DeepSeek's MLA attention reads the device lengths over the whole table width in a graph step. Models whose forward
needs host values (MoE experts run one by one: float experts, or ops without grouped experts) run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch

from slimquant.layers.attention import Attention, KVCacheLayer
from slimquant.layers.context import ForwardContext, forward_context
from slimquant.layers.mla import MLAttention
from slimquant.layers.moe import RoutedExperts

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_WIDTH = 8  # blocks: narrower block tables run in the 8-block graph


class Replay(Protocol):
    """A captured step: replay() recomputes out from the static buffers."""

    out: torch.Tensor

    def replay(self) -> None: ...


def graphs_supported(model: torch.nn.Module) -> bool:
    """Whether every part of model's forward runs without host values (attention or MLA; routed experts only
    where the ops run them grouped)."""
    modules = list(model.modules())
    caches = [m for m in modules if isinstance(m, KVCacheLayer)]
    return (
        bool(caches)
        and all(type(m) in (Attention, MLAttention) for m in caches)
        and all(m.grouped for m in modules if isinstance(m, RoutedExperts))
    )


def _buckets(limit: int, candidates: tuple[int, ...]) -> list[int]:
    """The candidates below limit, then limit itself."""
    return [c for c in candidates if c < limit] + [limit]


class CudaGraphDecoder:
    """Runs decode steps of up to max_num_seqs sequences as graph replays; other steps return None (eager)."""

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_blocks: int, block_size: int, scratch: int):
        self.model, self.block_size = model, block_size
        self.sizes = _buckets(max_num_seqs, BATCH_BUCKETS)
        self.widths = _buckets(max_blocks, tuple(MIN_WIDTH << i for i in range(24)))
        device = next(model.parameters()).device
        n, w = self.sizes[-1], self.widths[-1]
        self.scratch_block, self.scratch_slot = scratch, scratch * block_size
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)  # [N]
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)  # [N]
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)  # [N]
        self.tables = torch.full((n, w), scratch, dtype=torch.int32, device=device)  # [N, W]
        self.lens = torch.ones(n, dtype=torch.int32, device=device)  # [N]
        self.graphs: dict[tuple[int, int], Replay] = {}
        self.pool = None
        stand_in = partial(EagerReplay, self.forward)
        self.capture: Callable[[int, int], Replay] = self._capture_cuda if device.type == "cuda" else stand_in

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """hidden [B, H] of a decode step by graph replay, or None where no graph fits (run it eagerly)."""
        b, width = len(ctx.query_lens), ctx.block_tables.shape[1]
        size = next((s for s in self.sizes if s >= b), None)
        cols = next((c for c in self.widths if c >= width), None)
        if not ctx.is_decode or size is None or cols is None:
            return None
        self._fill(input_ids, positions, ctx, size)
        key = (size, cols)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.capture(size, cols)
            except RuntimeError as e:  # keep serving: eager steps are slower, not wrong
                logger.warning("CUDA graph capture failed, decoding eagerly from now on: %s", e)
                self.sizes = []
                return None
        self.graphs[key].replay()
        return self.graphs[key].out[:b]

    def _fill(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext, size: int) -> None:
        """Copy the step's inputs into rows [0, B) of the static buffers; rows [B, size) become padding."""
        b, width = len(ctx.query_lens), ctx.block_tables.shape[1]
        self.ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(ctx.slot_mapping)
        self.tables[:size].fill_(self.scratch_block)
        self.tables[:b, :width].copy_(ctx.block_tables)
        self.lens[:b].copy_(ctx.context_lens_tensor)
        self.ids[b:size].zero_()
        self.positions[b:size].zero_()
        self.slots[b:size].fill_(self.scratch_slot)
        self.lens[b:size].fill_(1)

    def context(self, size: int, width: int) -> ForwardContext:
        """The ForwardContext of a graph over the first `size` buffer rows and `width` table columns."""
        return ForwardContext(
            query_lens=[1] * size,
            context_lens=[1] * size,  # host lengths are not read in a graph step
            slot_mapping=self.slots[:size],
            block_tables=self.tables[:size, :width],
            block_size=self.block_size,
            device_context_lens=self.lens[:size],
        )

    def forward(self, size: int, width: int) -> torch.Tensor:
        """One eager forward over the static buffers (what a graph captures): hidden [size, H]."""
        with forward_context(self.context(size, width)):
            return self.model(self.ids[:size], self.positions[:size])

    def _capture_cuda(self, size: int, width: int) -> Replay:
        """Warm up, then capture forward(size, width) into the shared pool."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(size, width)  # warm-up: cuBLAS handles and workspaces exist before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            graph.out = self.forward(size, width)
        logger.info("captured a CUDA graph for decode of %d sequences over %d blocks", size, width)
        return graph


class EagerReplay:
    """A graph's CPU stand-in: replay() runs the same padded, fixed-shape forward eagerly (tests it without a GPU)."""

    def __init__(self, forward: Callable[[int, int], torch.Tensor], size: int, width: int):
        self.forward, self.size, self.width = forward, size, width
        self.out = torch.empty(0)

    def replay(self) -> None:
        self.out = self.forward(self.size, self.width)
