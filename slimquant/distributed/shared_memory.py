"""SharedMemoryExchange: the ranks of one machine swap small tensors through one shared-memory segment (a decode
step's all-reduce: 15-17 µs against gloo's 0.5-2 ms over loopback TCP on the 2-core VM; docs/benchmarks.md).

Each rank copies its tensor into its slot of one of two alternating buffers, then publishes the exchange's sequence
number in its counter, and waits until every rank's counter has reached it; then it reads every slot. Two buffers
suffice: a rank that reaches exchange s has seen every rank publish s - 1, so every rank has finished reading the
buffer of s - 2 that s overwrites. x86 keeps stores in order, which is what makes a published counter mean the slot
before it is written; other CPUs use gloo instead. A tensor past the slot size goes a slot's worth at a time.

A wait spins for its first _SPIN_SECONDS, then polls every 1% of the time it has waited, 1 to 10 ms (ranks waiting
for an idle server's next step use next to no CPU, and wake at most 10 ms late). Each rank writes its process id
beside its counter: a wait on a rank whose process is gone stops with an error within milliseconds, as gloo's does
when a peer's socket closes. A wait stops with an error after the engine's execute_model_timeout (a rank that
hangs), except a rank's that follows rank 0's steps (the engine's own ranks): it waits for the next one as long as
it takes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import torch

SLOT_BYTES = 1 << 20  # the most one exchange carries: larger tensors go a slot at a time (long prefill chunks)
_COUNTER_BYTES = 64  # one cache line per rank's counter
_COUNTER_WORDS = _COUNTER_BYTES // 8  # word 0: the rank's sequence number; word 1: its process id
_SPIN_SECONDS = 0.05  # a wait spins this long (a step's collectives), then polls (an idle server's ranks)
_POLL_SHARE = 0.01  # then it polls every 1% of the time it has waited (wakes at most 1% late) ...
_POLL_SECONDS = (0.001, 0.01)  # ... but at least every 10 ms and at most every 1 ms
_CHECK_EVERY = 1024  # spins between two checks of the peers' processes and of the clock


def segment_bytes(size: int) -> int:
    """The bytes of a segment for size ranks: a counter line each, two buffers of a slot each."""
    return size * _COUNTER_BYTES + 2 * size * SLOT_BYTES


def room_for(size: int, folder: str = "/dev/shm") -> bool:
    """Whether folder (where Linux keeps shared memory) has room for size ranks' segment: a segment larger than
    its free space maps, then kills the first rank that writes past it (SIGBUS; Docker's default is 64 MiB)."""
    try:
        return shutil.disk_usage(folder).free >= segment_bytes(size)
    except OSError:  # no such folder: not Linux's layout, nothing to check
        return True


class SharedMemoryExchange:
    """rank's view of a segment shared by size ranks on one machine (create it on one rank, attach on the others
    by its name)."""

    def __init__(
        self,
        rank: int,
        size: int,
        name: str | None = None,
        alive: Callable[[], bool] = lambda: True,
        timeout: float | None = None,
    ):
        """name None: create a new segment (its name in .name for the others); alive(): False stops a wait (the
        peers' processes are checked besides); timeout: seconds a wait lasts before it fails (rank 0's), None: no
        limit."""
        self.rank, self.size, self.alive, self.timeout = rank, size, alive, timeout
        total = segment_bytes(size) if name is None else 0
        self.segment = shared_memory.SharedMemory(name=name, create=name is None, size=total)
        self.name = self.segment.name
        # the counters as plain int64 words (read and written without torch: a decode step's exchange is a few µs)
        self.counters = (ctypes.c_int64 * (size * _COUNTER_WORDS)).from_buffer(self.segment.buf)
        self._words = [r * _COUNTER_WORDS for r in range(size)]  # each rank's counter
        raw = torch.frombuffer(self.segment.buf, dtype=torch.uint8)[size * _COUNTER_BYTES :]
        self.slots = [list(half) for half in raw.view(2, size, SLOT_BYTES)]  # [buffer][rank]: bytes [SLOT_BYTES]
        if name is None:
            ctypes.memset(self.counters, 0, ctypes.sizeof(self.counters))
        self.counters[self._words[rank] + 1] = os.getpid()
        self.seq = 0

    def exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (same shape and dtype on all), in rank order: views into the segment, to be read (not
        written) before this rank's next exchange, after which another rank may overwrite them. t: a CPU tensor of at
        most SLOT_BYTES."""
        self.seq += 1
        nbytes, t = t.numel() * t.element_size(), t.contiguous()
        assert t.device.type == "cpu" and nbytes <= SLOT_BYTES, (t.device, nbytes)
        ctypes.memmove(self.slots[self.seq % 2][self.rank].data_ptr(), t.data_ptr(), nbytes)
        self.counters[self._words[self.rank]] = self.seq  # publish: the slot is written
        self._wait_all(self.seq, self.timeout)
        return [part[:nbytes].view(t.dtype).view(t.shape) for part in self.slots[self.seq % 2]]

    def broadcast(self, data: bytes | None) -> bytes | None:
        """Rank 0's data on every rank (the others pass None); None on every rank where it does not fit a slot
        (send it another way)."""
        self.seq += 1
        slot = self.slots[self.seq % 2][0].data_ptr()  # rank 0's slot: [int64 length or -1][bytes]
        if self.rank == 0:
            assert data is not None, "rank 0 broadcasts bytes"
            fits = len(data) + 8 <= SLOT_BYTES
            ctypes.c_int64.from_address(slot).value = len(data) if fits else -1
            if fits:
                ctypes.memmove(slot + 8, data, len(data))
        self.counters[self._words[self.rank]] = self.seq
        self._wait_all(self.seq, self.timeout)
        n = ctypes.c_int64.from_address(slot).value
        if n < 0:
            return None
        return data if self.rank == 0 else ctypes.string_at(slot + 8, n)

    def _wait_all(self, seq: int, limit: float | None) -> None:
        # no local names for views of the segment here or in the callers before it returns: a traceback keeps its
        # frames, and a view in them would keep close() from unmapping the segment
        spins, since, idle = 0, None, False
        while any(self.counters[w] < seq for w in self._words):
            spins += 1
            if idle or spins % _CHECK_EVERY == 0:  # spinning: every _CHECK_EVERY turns; idle: every poll
                if who := self._gone():
                    raise RuntimeError(f"{who} of the tensor-parallel group stopped answering (shared-memory exchange)")
                since = since or time.monotonic()
                waited = time.monotonic() - since
                if limit is not None and waited > limit:
                    late = [rank for rank, word in enumerate(self._words) if self.counters[word] < seq]
                    raise RuntimeError(
                        f"rank(s) {late} of the tensor-parallel group did not answer in execute_model_timeout="
                        f"{limit:g} s (shared-memory exchange): hung or stopped"
                    )
                idle = waited >= _SPIN_SECONDS
                time.sleep(min(max(waited * _POLL_SHARE, _POLL_SECONDS[0]), _POLL_SECONDS[1]) if idle else 0)

    def sees_peers(self) -> bool:
        """Whether every other rank has attached and its process is visible from here (not in another container's
        process namespace): what the checks of a wait rely on."""
        return all(pid and _exists(pid) for pid in self._peer_pids().values())

    def _gone(self) -> str:
        """Which ranks' processes have ended ("rank(s) [1]"; they had attached), or "a rank" where alive() says one
        stopped; "" while all answer."""
        gone = [rank for rank, pid in self._peer_pids().items() if pid and not _exists(pid)]
        return f"rank(s) {gone}" if gone else "" if self.alive() else "a rank"

    def _peer_pids(self) -> dict[int, int]:
        """The other ranks' process ids (0: not attached yet)."""
        return {rank: self.counters[word + 1] for rank, word in enumerate(self._words) if rank != self.rank}

    def close(self, unlink: bool) -> None:
        """Detach (and remove the segment, on the rank that made it); nothing once closed."""
        if self.segment is None:
            return
        del self.counters, self.slots
        self.segment.close()
        if unlink:
            # gone already where a killed rank's resource tracker removed it (an attaching process registers too)
            with contextlib.suppress(FileNotFoundError):
                self.segment.unlink()
        self.segment = None


def _exists(pid: int) -> bool:
    """Whether a process pid exists (a zombie does, until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True
