"""SharedMemoryExchange: the ranks of one machine swap small tensors through one shared-memory segment (a decode
step's all-reduce: 15-17 µs against gloo's 0.5-2 ms over loopback TCP on the 2-core VM; docs/benchmarks.md).

Each rank copies its tensor into its slot of one of two alternating buffers, then publishes the exchange's sequence
number in its counter, and waits until every rank's counter has reached it; then it reads every slot. Two buffers
suffice: a rank that reaches exchange s has seen every rank publish s - 1, so every rank has finished reading the
buffer of s - 2 that s overwrites. x86 keeps stores in order, which is what makes a published counter mean the slot
before it is written; tensors past the slot size, and other CPUs, use gloo instead.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import torch

SLOT_BYTES = 1 << 20  # the largest tensor exchanged here; larger ones (long prefill chunks) go through gloo
_COUNTER_BYTES = 64  # one cache line per rank's counter
_COUNTER_WORDS = _COUNTER_BYTES // 8


class SharedMemoryExchange:
    """rank's view of a segment shared by size ranks on one machine (create it on one rank, attach on the others
    by its name)."""

    def __init__(self, rank: int, size: int, name: str | None = None, alive: Callable[[], bool] = lambda: True):
        """name None: create a new segment (its name in .name for the others); alive(): False stops a wait."""
        self.rank, self.size, self.alive = rank, size, alive
        total = size * _COUNTER_BYTES + 2 * size * SLOT_BYTES
        self.segment = shared_memory.SharedMemory(name=name, create=name is None, size=total if name is None else 0)
        self.name = self.segment.name
        # the counters as plain int64 words (read and written without torch: a decode step's exchange is a few µs)
        self.counters = (ctypes.c_int64 * (size * _COUNTER_WORDS)).from_buffer(self.segment.buf)
        self._words = [r * _COUNTER_WORDS for r in range(size)]  # each rank's counter
        raw = torch.frombuffer(self.segment.buf, dtype=torch.uint8)[size * _COUNTER_BYTES :]
        self.slots = [list(half) for half in raw.view(2, size, SLOT_BYTES)]  # [buffer][rank]: bytes [SLOT_BYTES]
        if name is None:
            ctypes.memset(self.counters, 0, ctypes.sizeof(self.counters))
        self.seq = 0

    def fits(self, t: torch.Tensor) -> bool:
        """Whether t goes through shared memory (a CPU tensor of at most SLOT_BYTES)."""
        return t.device.type == "cpu" and t.numel() * t.element_size() <= SLOT_BYTES

    def exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (same shape and dtype on all), in rank order: views into the segment, to be read (not
        written) before this rank's next exchange, after which another rank may overwrite them."""
        self.seq += 1
        buffer, nbytes, t = self.slots[self.seq % 2], t.numel() * t.element_size(), t.contiguous()
        ctypes.memmove(buffer[self.rank].data_ptr(), t.data_ptr(), nbytes)
        self.counters[self._words[self.rank]] = self.seq  # publish: the slot is written
        self._wait_all(self.seq)
        return [buffer[r][:nbytes].view(t.dtype).view(t.shape) for r in range(self.size)]

    def _wait_all(self, seq: int) -> None:
        counters, spins = self.counters, 0
        while any(counters[w] < seq for w in self._words):
            spins += 1
            if spins % 1024 == 0:
                if not self.alive():
                    raise RuntimeError("a tensor-parallel rank stopped answering (shared-memory exchange)")
                time.sleep(0)

    def close(self, unlink: bool) -> None:
        """Detach (and remove the segment, on the rank that made it); nothing once closed."""
        if self.segment is None:
            return
        del self.counters, self.slots
        self.segment.close()
        if unlink:
            self.segment.unlink()
        self.segment = None
