"""TensorParallel: this process's place in a tensor-parallel group, and the collectives the layers call.

Size 1 (SINGLE) is one process: every collective returns its input. The collectives keep one process's numbers:
sums are only ever taken over int32 accumulators (exact in any order), maxima are exact, and gathers concatenate
in rank order. A step's inputs and host tensors go through step_group (gloo; rank 0's waits there last the engine's
execute_model_timeout at most), or shared memory where the ranks share a machine; CUDA tensors through device_group
(NCCL) where the ranks run on GPUs; what the ranks agree on at start-up through group (gloo, no practical limit:
loading may take long).
"""

from __future__ import annotations

import io
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from slimquant.distributed.shared_memory import SLOT_BYTES, SharedMemoryExchange


class MidStepFailure(RuntimeError):
    """Rank 0 failed between sending a step to the other ranks and the step's last collective: they are left inside
    it, and the group cannot go on (its cause: what failed)."""


@dataclass(frozen=True)
class TensorParallel:
    """rank of size processes in group (None: torch.distributed's default group)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    step_group: dist.ProcessGroup | None = None  # a step's inputs and host tensors (gloo); None: group
    device_group: dist.ProcessGroup | None = None  # CUDA tensors' collectives (NCCL); None: step_group's
    local: SharedMemoryExchange | None = None  # ranks on one machine: small tensors through shared memory
    expert_parallel: bool = False  # MoE layers: whole experts per rank instead of a part of every expert
    order: str = "exact"  # how row-parallel linears reduce: config.TENSOR_PARALLEL_ORDERS
    # rank 0 of several nodes: set when a rank died or a node is lost (WorkerGroup.watch); its waits in the host
    # group's collectives then end (AbandonedCollective) instead of lasting until gloo's timeout
    abandon: threading.Event | None = None

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.size, (self.rank, self.size)

    @classmethod
    def from_default_group(cls, size: int) -> TensorParallel:
        """The initialized default group (torchrun, or the caller's init_process_group) as a group of size."""
        if size == 1:
            return SINGLE
        assert dist.is_initialized(), "ranks the engine starts itself make their own group (WorkerGroup)"
        if dist.get_world_size() != size:
            raise ValueError(f"tensor_parallel_size={size}, but torch.distributed has {dist.get_world_size()} ranks")
        return cls(dist.get_rank(), size)

    def share(self, n: int, what: str, groups: int | None = None) -> tuple[int, int]:
        """(start, length) of this rank's equal part of n items; ValueError naming what when n does not divide.
        groups < size: n splits into groups parts, each held by size / groups consecutive ranks (vLLM's
        replicated kv heads)."""
        groups = groups or self.size
        if groups < self.size and self.size % groups:
            raise ValueError(f"tensor_parallel_size = {self.size} is not a multiple of {what} = {groups}")
        if n % groups:
            raise ValueError(f"{what} = {n} is not divisible by tensor_parallel_size = {self.size}")
        part = n // groups
        return self.rank // (self.size // groups) * part, part

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of an integer tensor (in place)."""
        assert not t.is_floating_point(), "float sums would depend on the order: reduce int32 accumulators"
        return self._sum(t)

    def sum_disjoint(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a tensor each element of which is zero on all ranks but one at most: exact in any order,
        float too (in place)."""
        return self._sum(t)

    def sum_float(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of float partial results in the collective's order (in place): vLLM-Ascend's row-parallel
        reduction; every rank gets the same values, but not one process's bits."""
        return self._sum(t)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self._shared(t):
            return self._combine_shared(t, torch.Tensor.add_)
        if self.size > 1:
            self._run(dist.all_reduce, t, dist.ReduceOp.SUM, group=self._group_of(t))
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (in place)."""
        if self._shared(t):
            return self._combine_shared(t, lambda t, part: torch.maximum(t, part, out=t))
        if self.size > 1:
            self._run(dist.all_reduce, t, dist.ReduceOp.MAX, group=self._group_of(t))
        return t

    def _shared(self, t: torch.Tensor) -> bool:
        """Whether t's collective goes through shared memory (a CPU tensor, ranks on one machine)."""
        return self.local is not None and t.device.type == "cpu"

    def _combine_shared(self, t: torch.Tensor, combine: Callable[[torch.Tensor, torch.Tensor], object]) -> torch.Tensor:
        """t made rank 0's t, then combined in place with each next rank's, in rank order (shared memory, a slot's
        worth of elements at a time)."""
        work = t if t.is_contiguous() else t.contiguous()
        for piece in work.view(-1).split(SLOT_BYTES // t.element_size()):  # views of work: [<= slot's elements]
            parts = self.local.exchange(piece)  # views into the segment
            piece.copy_(parts[0])
            for part in parts[1:]:
                combine(piece, part)
        return t if work is t else t.copy_(work)

    def min_int(self, n: int) -> int:
        """The smallest of every rank's n (what all ranks can allocate)."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def broadcast(self, obj: object = None) -> object:
        """Rank 0's obj on every rank (picklable; others pass nothing): through shared memory where it fits a slot,
        else gloo."""
        if self.size == 1:
            return obj
        data = _dumps(obj) if self.rank == 0 else None
        got = self.local.broadcast(data) if self.local is not None else None
        if got is None:
            got = self._broadcast_bytes(data)
        return obj if self.rank == 0 else pickle.loads(got)

    def _broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's data on every rank (others pass None), through the host group: its length, then its bytes."""
        group = self._host_group()
        length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        self._run(dist.broadcast, length, src=0, group=group)
        if data is not None:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [length]
        else:
            buffer = torch.empty(int(length.item()), dtype=torch.uint8)  # [length]
        self._run(dist.broadcast, buffer, src=0, group=group)
        return data if data is not None else buffer.numpy().tobytes()

    def barrier(self) -> None:
        """Wait until every rank reaches this point (in the host group: its waits are a step's)."""
        if self.size > 1:
            self._run(dist.barrier, group=self._host_group())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t [..., n] concatenated along the last dim in rank order -> [..., size * n]."""
        if self.size == 1:
            return t
        if self._shared(t):
            return self._gather_shared(t)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._run(dist.all_gather, parts, t.contiguous(), group=self._group_of(t))
        return torch.cat(parts, dim=-1)

    def _gather_shared(self, t: torch.Tensor) -> torch.Tensor:
        """gather through shared memory, a slot's worth at a time: whole rows where one fits, else parts of a row."""
        n = t.shape[-1]
        rows = t.reshape(-1, n)  # [R, n]
        out = torch.empty(rows.shape[0], self.size, n, dtype=t.dtype)  # [R, ranks, n]
        width = min(n, SLOT_BYTES // t.element_size())  # columns a piece holds
        step = SLOT_BYTES // (width * t.element_size())  # rows a piece holds
        for c in range(0, n, width):
            for r in range(0, rows.shape[0], step):
                for rank, part in enumerate(self.local.exchange(rows[r : r + step, c : c + width])):
                    out[r : r + step, rank, c : c + width] = part
        return out.view(*t.shape[:-1], self.size * n)

    def _run(self, collective: Callable, *args: object, group: dist.ProcessGroup | None, **kwargs: object) -> None:
        """collective(*args, group=group, **kwargs); where this rank may abandon its waits (abandon) and the group
        is the host's, waited for in slices, and AbandonedCollective once abandon is set. A failure of the
        collective itself (a peer's socket closed, gloo's timeout) is raised as it is."""
        if self.abandon is None or group is not self._host_group():
            collective(*args, group=group, **kwargs)
            return
        work = collective(*args, group=group, async_op=True, **kwargs)
        while True:
            try:
                work.wait(timeout=_WAIT_SLICE)
                return
            except RuntimeError:
                if work.is_completed():  # it failed, not the slice
                    raise
            if self.abandon.is_set():
                raise AbandonedCollective("rank 0 abandoned a collective: a rank died or a node is lost")

    def _group_of(self, t: torch.Tensor) -> dist.ProcessGroup | None:
        """The group that reduces t: device_group for a CUDA tensor where there is one, else the host group."""
        if t.is_cuda and self.device_group is not None:
            return self.device_group
        return self._host_group()

    def _host_group(self) -> dist.ProcessGroup | None:
        """The group of a step's host collectives: step_group where there is one, else group."""
        return self.step_group if self.step_group is not None else self.group


SINGLE = TensorParallel()
_WAIT_SLICE = timedelta(seconds=0.25)  # how often a wait that may be abandoned looks whether it is


class AbandonedCollective(RuntimeError):
    """Rank 0 stopped waiting for a collective because a rank died or a node is lost (TensorParallel.abandon)."""


def timed_out(e: BaseException) -> bool:
    """Whether e is a gloo collective's timeout: gloo says "Timed out waiting ..." from its transport, or
    "Operation timed out!" from its work's wait, whichever side gives up first."""
    return "timed out" in str(e).lower()


class _HostPickler(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays: a step's inputs in 30 µs instead of torch's 170 (and 14 µs to load
    instead of 250)."""

    def reducer_override(self, obj: object) -> object:
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.dtype in _NUMPY_DTYPES:
            return torch.from_numpy, (obj.detach().numpy(),)
        return NotImplemented


_NUMPY_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32)


def _dumps(obj: object) -> bytes:
    out = io.BytesIO()
    _HostPickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return out.getvalue()
