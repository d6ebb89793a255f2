"""SharedMemoryExchange: the ranks of one machine swap small tensors through one shared-memory segment (a decode
step's all-reduce: 50 µs against gloo's 0.5-1.4 ms over loopback TCP on the 2-core VM; docs/benchmarks.md).

Each rank copies its tensor into its slot of one of two alternating buffers, then publishes the exchange's sequence
number in its counter, and waits until every rank's counter has reached it; then it reads every slot. Two buffers
suffice: a rank that reaches exchange s has seen every rank publish s - 1, so every rank has finished reading the
buffer of s - 2 that s overwrites. x86 keeps stores in order, which is what makes a published counter mean the slot
before it is written; tensors past the slot size, and other CPUs, use gloo instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing import shared_memory

import torch

SLOT_BYTES = 1 << 20  # the largest tensor exchanged here; larger ones (long prefill chunks) go through gloo
_COUNTER_BYTES = 64  # one cache line per rank's counter


class SharedMemoryExchange:
    """rank's view of a segment shared by size ranks on one machine (create it on one rank, attach on the others
    by its name)."""

    def __init__(self, rank: int, size: int, name: str | None = None, alive: Callable[[], bool] = lambda: True):
        """name None: create a new segment (its name in .name for the others); alive(): False stops a wait."""
        self.rank, self.size, self.alive = rank, size, alive
        total = size * _COUNTER_BYTES + 2 * size * SLOT_BYTES
        self.segment = shared_memory.SharedMemory(name=name, create=name is None, size=total if name is None else 0)
        self.name = self.segment.name
        raw = torch.frombuffer(self.segment.buf, dtype=torch.uint8)
        self.counters = raw[: size * _COUNTER_BYTES].view(torch.int64).view(size, -1)[:, 0]  # [size]
        self.slots = raw[size * _COUNTER_BYTES :].view(2, size, SLOT_BYTES)  # [buffer, rank, bytes]
        if name is None:
            self.counters.zero_()
        self.seq = 0

    def fits(self, t: torch.Tensor) -> bool:
        """Whether t goes through shared memory (a CPU tensor of at most SLOT_BYTES)."""
        return t.device.type == "cpu" and t.numel() * t.element_size() <= SLOT_BYTES

    def exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (same shape and dtype on all), in rank order."""
        self.seq += 1
        buffer, nbytes = self.slots[self.seq % 2], t.numel() * t.element_size()
        buffer[self.rank, :nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
        self.counters[self.rank] = self.seq  # publish: the slot is written
        self._wait_all(self.seq)
        return [buffer[r, :nbytes].view(t.dtype).view(t.shape).clone() for r in range(self.size)]

    def _wait_all(self, seq: int) -> None:
        spins = 0
        while int(self.counters.min()) < seq:
            spins += 1
            if spins % 1024 == 0:
                if not self.alive():
                    raise RuntimeError("a tensor-parallel rank stopped answering (shared-memory exchange)")
                time.sleep(0)

    def close(self, unlink: bool) -> None:
        """Detach (and remove the segment, on the rank that made it)."""
        del self.counters, self.slots
        self.segment.close()
        if unlink:
            self.segment.unlink()
