"""The shared-memory exchange gives what gloo gives: int32 sums, maxima and rank-order gathers, exact, for tensors
up to its slot size (larger ones go through gloo); a wait on a rank that is gone stops."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimquant.distributed.launch import run_ranks
from slimquant.distributed.shared_memory import SLOT_BYTES, SharedMemoryExchange
from slimquant.distributed.tensor_parallel import TensorParallel


def _compare(rank: int, size: int) -> int:
    """Each collective through gloo and through shared memory, on the same inputs; how many agreed."""
    gloo = TensorParallel(rank, size)
    local = SharedMemoryExchange(0, size) if rank == 0 else None
    name = gloo.broadcast(local.name if local else None)
    local = local or SharedMemoryExchange(rank, size, name)
    shm = dataclasses.replace(gloo, local=local)
    agreed = 0
    for step in range(5):  # both buffers, several times
        g = torch.Generator().manual_seed(100 * step + rank)
        ints = torch.randint(-(2**20), 2**20, (7, 33), generator=g, dtype=torch.int32)
        floats = torch.randn(5, 9, generator=g)
        big = torch.full((SLOT_BYTES // 4 + 1,), rank + 1, dtype=torch.int32)  # past the slot: gloo
        pairs = [
            (gloo.sum(ints.clone()), shm.sum(ints.clone())),
            (gloo.max(floats.clone()), shm.max(floats.clone())),
            (gloo.gather(floats), shm.gather(floats)),
            (gloo.sum(big.clone()), shm.sum(big.clone())),
        ]
        agreed += sum(torch.equal(a, b) for a, b in pairs)
    gloo.barrier()
    local.close(unlink=rank == 0)
    return agreed


@pytest.mark.parametrize("size", [2, 3])
def test_shared_memory_collectives_equal_gloo(size):
    assert run_ranks(_compare, size) == [20] * size


def test_a_wait_on_a_rank_that_is_gone_stops():
    alive = iter([True, True, False])
    local = SharedMemoryExchange(0, 2, alive=lambda: next(alive))
    try:
        with pytest.raises(RuntimeError, match="stopped answering"):
            local.exchange(torch.ones(4))
    finally:
        local.close(unlink=True)


def _links(rank: int, size: int, unreachable: int | None) -> bool:
    """Whether this rank exchanges through shared memory after rank 0 offers it (rank unreachable, if any, cannot
    attach: as on another machine)."""
    from slimquant.distributed import workers

    if rank == unreachable:
        workers._attach = lambda tp, name: None
    tp = workers._share_memory(TensorParallel(rank, size), True)
    shared = tp.local is not None
    if shared:
        tp.local.close(unlink=rank == 0)
    return shared


def test_shared_memory_only_where_every_rank_can_attach():
    assert run_ranks(_links, 3, None) == [True] * 3
    assert run_ranks(_links, 3, 2) == [False] * 3  # one rank elsewhere: gloo for all


def _launched_local(rank: int, size: int, path: str) -> bool:
    from slimquant import LLM

    llm = LLM(path, kernels={"backend": "torch-reference"}, max_model_len=64, tensor_parallel_size=size)
    return llm.llm_engine.tp.local is not None


def test_torchrun_style_ranks_on_one_machine_exchange_through_shared_memory(tiny_model):
    assert run_ranks(_launched_local, 2, str(tiny_model("llama"))) == [True, True]
