"""ModelRunner: owns the model and its KV cache; turns a ScheduledBatch into tensors, runs it through the
backend, and has the step sampler sample (engine/step_sampler.py)."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import torch

from slimquant.backends.base import Backend
from slimquant.config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from slimquant.distributed.tensor_parallel import SINGLE, MidStepFailure, TensorParallel, timed_out
from slimquant.engine.scheduler import ScheduledBatch
from slimquant.engine.sequence import Sequence
from slimquant.engine.step_sampler import LogitRows, StepResult, StepSampler, rows_at
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext
from slimquant.layers.sampler import Sampler

logger = logging.getLogger(__name__)
KEEPALIVE = "keepalive"  # what rank 0 broadcasts instead of a step while it idles (ModelRunner.keepalive) ...
KEEPALIVE_SHARE = 0.25  # ... after this share of execute_model_timeout without a step, ...
KEEPALIVE_MAX = 5.0  # ... or these seconds if fewer: an idle rank 0 sees a node gone (its broadcast fails) in them
_SILENT = "it hangs or was stopped, or its machine or the network to it is gone"  # what a rank's silence means


@dataclass
class StepInputs:
    """Packed inputs of one forward and which hidden rows need logits."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    context: ForwardContext
    rows: LogitRows


class ModelRunner:
    """Runs the model's steps through its backend over the paged KV cache it allocates on every KVCacheLayer.

    Tensor parallel: with broadcast (this is rank 0 of ranks the engine started), each step's inputs go to the
    other ranks, which run the same forward in serve_steps(); without it (torchrun), every rank runs its own
    engine on the same requests. The ranks agree on the number of KV blocks."""

    def __init__(
        self,
        config: EngineConfig,
        model: torch.nn.Module,
        backend: Backend,
        kv_dtype: torch.dtype,
        tp: TensorParallel = SINGLE,
        broadcast: bool = False,
    ):
        self.config, self.tp, self.broadcast = config, tp, broadcast
        self._step_lock = threading.Lock()  # rank 0: a step's collectives, or a keepalive, at a time
        self._sent = time.monotonic()  # rank 0: when the other ranks last heard from it
        self.model, self.backend = model, backend
        self.device = torch.device(config.rank_device(tp.rank))  # cuda:LOCAL_RANK for a rank on a GPU
        self.block_size = config.block_size
        self.num_blocks = self._allocate_kv_cache(kv_dtype, scratch_blocks=backend.scratch_blocks(model))
        max_blocks = -(-config.max_model_len // self.block_size)  # scratch block num_blocks: padding rows' writes
        backend.start(model, config.max_num_seqs, max_blocks, self.block_size, self.num_blocks)
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = StepSampler(backend.head(model), Sampler(generator), self.device)

    def _allocate_kv_cache(self, dtype: torch.dtype, scratch_blocks: int = 0) -> int:
        """Zero KV tensors for the configured budget (+ scratch blocks) on every KVCacheLayer; returns the number
        of blocks for sequences."""
        layers = [m for m in self.model.modules() if isinstance(m, KVCacheLayer)]
        assert layers, "the model has no KVCacheLayer"
        block_bytes = sum(math.prod(layer.cache_shape(1, self.block_size)) for layer in layers) * dtype.itemsize
        num_blocks = self.tp.min_int(self.config.num_kv_blocks or self._blocks_for_budget(block_bytes))
        if num_blocks * self.block_size < self.config.max_model_len:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {self.block_size} tokens) cannot hold one sequence of "
                f"max_model_len={self.config.max_model_len} tokens; raise kv_cache_memory_bytes / num_kv_blocks "
                "or lower max_model_len"
            )
        for layer in layers:
            layer.kv_cache = torch.zeros(
                layer.cache_shape(num_blocks + scratch_blocks, self.block_size), dtype=dtype, device=self.device
            )
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB)", num_blocks, self.block_size, num_blocks * block_bytes / 2**20
        )
        return num_blocks

    def _blocks_for_budget(self, block_bytes: int) -> int:
        budget = self.config.kv_cache_memory_bytes
        if budget is None:  # enough for max_num_seqs full-length sequences, capped
            wanted = self.config.max_num_seqs * -(-self.config.max_model_len // self.block_size) * block_bytes
            budget = min(wanted, DEFAULT_KV_CACHE_BYTES)
        return budget // block_bytes

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one forward over the batch, sample where a sequence reached its last token."""
        inputs = self.prepare(batch)
        split_head = self.model.vocab_tp.size > 1  # every rank computes its part of the logits
        indices = inputs.rows.indices() if split_head else None
        greedy = split_head and inputs.rows.argmax_only()
        tokens = logits = None
        with self._step_lock:
            try:  # the part the other ranks run too
                if self.broadcast:  # as host tensors: each rank moves them to its own device
                    host = inputs.context.to(torch.device("cpu"))
                    self._send((inputs.input_ids.cpu(), inputs.positions.cpu(), host, indices, greedy))
                hidden = self.backend.forward(self.model, inputs.input_ids, inputs.positions, inputs.context)
                if split_head:
                    tokens = self._split_argmax(hidden, indices) if greedy else None
                    logits = self._logits(hidden, indices) if tokens is None else None
            except Exception as e:
                if self.broadcast:
                    raise MidStepFailure(f"{type(e).__name__}: {e}{self._late(e)}") from e
                if late := self._late(e):  # every rank runs its own engine (torchrun): gloo says only "timed out"
                    raise RuntimeError(f"{e}{late}") from e
                raise
        if not split_head:
            return self.sampler.sample(hidden, inputs.rows)
        if tokens is not None:
            return StepResult(inputs.rows.sample_seqs, Sampler.unscored_output(tokens), [])
        return self.sampler.sample_logits(logits, inputs.rows)

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """A rank > 0: run the forward of each step rank 0 broadcasts, until it broadcasts None."""
        while (step := self._next_step()) is not None:
            if step == KEEPALIVE:
                continue
            input_ids, positions, context, indices, greedy = step
            ids, positions, context = input_ids.to(self.device), positions.to(self.device), context.to(self.device)
            hidden = self.backend.forward(self.model, ids, positions, context)
            if not (greedy and self._split_argmax(hidden, indices) is not None):
                self._logits(hidden, indices)
        self.tp.barrier()  # every rank has the stop before any leaves the group

    def _split_argmax(self, hidden: torch.Tensor, indices: list[int]) -> list[int] | None:
        """Greedy tokens of the hidden rows at indices where the head is split and its head screens each rank's
        part (a collective), else None (every rank alike: then the logits are gathered)."""
        if not self.sampler.head.screens_locally():
            return None
        return self.model.split_argmax(self.sampler.head.local_best(rows_at(hidden, indices)), len(indices))

    def _logits(self, hidden: torch.Tensor, indices: list[int] | None) -> torch.Tensor | None:
        """Logits [len(indices), V] of the hidden rows at indices, where the head is split (a collective); else
        None."""
        if not indices:
            return None
        return self.model.compute_logits(rows_at(hidden, indices))

    def _next_step(self) -> object:
        """A rank > 0: what rank 0 broadcasts next (a step, KEEPALIVE, or None: stop)."""
        try:
            return self.tp.broadcast()
        except RuntimeError as e:
            if not timed_out(e):
                raise
            wait = self.config.execute_model_timeout
            raise RuntimeError(
                f"rank 0 sent nothing in execute_model_timeout={wait:g} s (it sends a keepalive every "
                f"{self.keepalive_period:g} s while idle): {_SILENT}"
            ) from e

    def _late(self, e: Exception) -> str:
        """What a step's collective that timed out means (gloo says only that it timed out), else ""."""
        if not timed_out(e):
            return ""
        return f": a rank did not answer in execute_model_timeout={self.config.execute_model_timeout:g} s ({_SILENT})"

    @property
    def keepalive_period(self) -> float:
        """Seconds without a step after which rank 0 broadcasts KEEPALIVE."""
        return min(self.config.execute_model_timeout * KEEPALIVE_SHARE, KEEPALIVE_MAX)

    def keepalive(self) -> None:
        """Rank 0: broadcast KEEPALIVE where the other ranks have heard nothing from it for keepalive_period: ranks
        on other machines wait for it execute_model_timeout at most."""
        with self._step_lock:
            if time.monotonic() - self._sent >= self.keepalive_period:
                self._send(KEEPALIVE)

    def _send(self, obj: object) -> None:
        """Rank 0: broadcast obj to the other ranks (under the step lock)."""
        self.tp.broadcast(obj)
        self._sent = time.monotonic()

    def stop_serving(self) -> None:
        """Rank 0: let the other ranks' serve_steps() return."""
        if self.broadcast:
            with self._step_lock:
                self._send(None)
                self.tp.barrier()

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Pack the scheduled tokens of all sequences along one axis and describe them in a ForwardContext."""
        ids, positions, slots, rows = [], [], [], LogitRows()
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            rows.add(seq, start, end, len(ids))
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [self._slot(seq, p) for p in range(start, end)]
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in batch.seqs]  # [B, width]
        context = ForwardContext(
            query_lens=list(batch.num_new_tokens),
            context_lens=[s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)],
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            block_size=self.block_size,
        )
        return StepInputs(self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), context, rows)

    def _slot(self, seq: Sequence, position: int) -> int:
        """Flat KV slot of a token position: block id * block_size + offset in its block."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
