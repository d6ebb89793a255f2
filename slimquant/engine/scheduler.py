"""Continuous batching: each step packs running sequences (decode or prefill chunks) then admits waiting ones.

A sequence is scheduled for num_new_tokens = tokens not yet in its KV cache (capped by the token budget, so a
long prompt is prefilled in chunks). When KV blocks run out, the most recently admitted running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the waiting queue, keeping the
tokens it generated, which are prefilled again when it resumes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from slimquant.config import EngineConfig
from slimquant.engine.block_manager import BlockManager
from slimquant.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens each one runs."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        """Schedule n new tokens of seq."""
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Waiting and running queues over one BlockManager."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's sequences: running ones first (preempting on KV shortage), then waiting ones."""
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.extend(seq, seq.num_computed_tokens + n):
                self._preempt(self.running.pop())
                if i >= len(self.running):
                    return budget
            batch.add(seq, n)
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.match_prefix(seq)
            cached = len(hits) * self.block_manager.block_size
            n = min(seq.num_tokens - cached, budget)
            if n < seq.num_tokens - cached and not self.chunked_prefill:
                return
            if not self.block_manager.allocate(seq, cached + n, hits):
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch) -> None:
        """After the forward: the scheduled tokens are now in the KV cache."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
