"""The shared-memory exchange gives what gloo gives: int32 sums, maxima and rank-order gathers, exact, for tensors
of any size (past its slot size a slot at a time, a gather's rows in parts where one is longer than a slot), and
rank 0's objects; a wait on a rank that is gone stops, and a long wait does not hold a core."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import time

import pytest
import torch
import torch.distributed as dist

from slimquant.distributed.launch import run_ranks
from slimquant.distributed.shared_memory import SLOT_BYTES, SharedMemoryExchange, segment_bytes
from slimquant.distributed.tensor_parallel import TensorParallel


def _compare(rank: int, size: int) -> tuple[int, int]:
    """Each collective through gloo and through shared memory, on the same inputs: how many agreed, and how many of
    the shared-memory ones went through gloo."""
    gloo = TensorParallel(rank, size)
    local = SharedMemoryExchange(0, size) if rank == 0 else None
    name = gloo.broadcast(local.name if local else None)
    local = local or SharedMemoryExchange(rank, size, name)
    shm = dataclasses.replace(gloo, local=local)
    agreed, shm_through_gloo = 0, 0
    for step in range(5):  # both buffers, several times
        g = torch.Generator().manual_seed(100 * step + rank)
        ints = torch.randint(-(2**20), 2**20, (7, 33), generator=g, dtype=torch.int32)
        floats = torch.randn(5, 9, generator=g)
        # past one slot (a long prefill chunk's activations): 2.5 slots, in slot-sized pieces
        big = torch.randint(-(2**20), 2**20, (5 * SLOT_BYTES // 4 // 2 // 64, 64), generator=g, dtype=torch.int32)
        wide = torch.randn(3 * SLOT_BYTES // 4 // 256 + 5, 256, generator=g)  # a gather of more than a slot of rows
        strided = torch.randn(SLOT_BYTES // 4 // 100 + 3, 200, generator=g)[:, ::2]  # not contiguous
        long = torch.randn(2, 3, SLOT_BYTES // 4 + 100, generator=g)  # rows past a slot: a vocabulary's logits
        pairs = [
            (gloo.sum(ints.clone()), shm.sum(ints.clone())),
            (gloo.max(floats.clone()), shm.max(floats.clone())),
            (gloo.gather(floats), shm.gather(floats)),
            (gloo.sum(big.clone()), shm.sum(big.clone())),
            (gloo.max(strided.clone()), shm.max(strided.clone())),
        ]
        with _counting_gloo() as calls:
            pairs += [(gloo.gather(wide), shm.gather(wide)), (gloo.sum(big.clone()), shm.sum(big.clone()))]
            pairs += [(gloo.gather(long), shm.gather(long))]
        pairs += [(torch.tensor(len(calls)), torch.tensor(3))]  # gloo's own three calls, none for shared memory
        agreed += sum(torch.equal(a, b) for a, b in pairs)
        shm_through_gloo += len(calls) - 3
    gloo.barrier()
    local.close(unlink=rank == 0)
    return agreed, shm_through_gloo


@contextlib.contextmanager
def _counting_gloo():
    """The all-reduce and all-gather calls made to torch.distributed inside the block."""
    calls, reduce, gather = [], dist.all_reduce, dist.all_gather
    dist.all_reduce = lambda *a, **k: (calls.append("reduce"), reduce(*a, **k))[1]
    dist.all_gather = lambda *a, **k: (calls.append("gather"), gather(*a, **k))[1]
    try:
        yield calls
    finally:
        dist.all_reduce, dist.all_gather = reduce, gather


@pytest.mark.parametrize("size", [2, 3])
def test_shared_memory_collectives_equal_gloo(size):
    assert run_ranks(_compare, size) == [(45, 0)] * size


def _broadcasts(rank: int, size: int) -> tuple[int, list]:
    """Rank 0's objects as each rank got them, and how many went through gloo."""
    tp = TensorParallel(rank, size)
    name = tp.broadcast(SharedMemoryExchange(0, size).name if rank == 0 else None)
    tp = dataclasses.replace(tp, local=SharedMemoryExchange(rank, size, name))
    through_gloo, gloo_broadcast = [], TensorParallel._broadcast_bytes
    TensorParallel._broadcast_bytes = lambda *a: (through_gloo.append(1), gloo_broadcast(*a))[1]
    sent = [
        (torch.arange(6).view(2, 3)[:, 1], {"ids": [1, 2]}, torch.ones(2, dtype=torch.bfloat16)),  # a view, bf16
        None,
        torch.full((SLOT_BYTES // 8 + 1,), 7),  # past the slot: gloo
        "after",
    ]
    got = [tp.broadcast(obj if rank == 0 else None) for obj in sent]
    same = [
        torch.equal(got[0][0], sent[0][0]) and got[0][1] == sent[0][1] and torch.equal(got[0][2], sent[0][2]),
        got[1] is None,
        torch.equal(got[2], sent[2]),
        got[3] == "after",
    ]
    tp.barrier()
    tp.local.close(unlink=rank == 0)
    return len(through_gloo), same


def test_broadcast_goes_through_shared_memory_where_it_fits():
    assert run_ranks(_broadcasts, 3) == [(1, [True] * 4)] * 3


def _attach_then(name: str, seconds: float) -> None:
    """Rank 1 of a two-rank segment: attach, stay seconds, answer one exchange, then exit."""
    local = SharedMemoryExchange(1, 2, name)
    time.sleep(seconds)
    local.exchange(torch.ones(4))
    local.close(unlink=False)


def test_a_wait_on_a_process_that_is_gone_stops_within_seconds():
    deadline = time.monotonic() + 60  # without the check of the peer's process, the wait would end only here
    local, ctx = SharedMemoryExchange(0, 2, alive=lambda: time.monotonic() < deadline), mp.get_context("spawn")
    try:
        peer = ctx.Process(target=_attach_then, args=(local.name, 0.5))
        peer.start()
        local.exchange(torch.ones(4))  # the peer answers one
        peer.join()  # then exits: gone once reaped
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] of the tensor-parallel group stopped answering"):
            local.exchange(torch.ones(4))
        assert time.monotonic() - start < 10
    finally:
        local.close(unlink=True)


def test_a_long_wait_does_not_hold_a_core():
    local, ctx = SharedMemoryExchange(0, 2), mp.get_context("spawn")
    try:
        peer = ctx.Process(target=_attach_then, args=(local.name, 3.0))
        peer.start()
        wall, cpu = time.monotonic(), time.process_time()
        local.exchange(torch.ones(4))  # waits about 3 s: mostly asleep
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        peer.join()
        assert wall > 2 and cpu < 0.3 * wall, (wall, cpu)
    finally:
        local.close(unlink=True)


def test_a_wait_inside_a_step_fails_after_the_timeout_naming_the_rank():
    local, ctx = SharedMemoryExchange(0, 2, timeout=1.0), mp.get_context("spawn")
    peer = ctx.Process(target=_attach_then, args=(local.name, 8.0))  # hangs 8 s, as a stopped process would
    try:
        peer.start()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] .* did not answer in execute_model_timeout=1 s"):
            local.exchange(torch.ones(4))
        assert 1 <= time.monotonic() - start < 5
    finally:
        peer.kill()
        peer.join()
        local.close(unlink=True)


def _late_to_a_step(rank: int, size: int, offer: bool, follows: bool) -> tuple[str, float]:
    """Ranks linked as the engine links them, with a 1 s execute_model_timeout. follows: rank 1 follows rank 0's
    steps (the engine's own ranks); it waits 2 s for the next one (in shared memory without limit; in gloo rank 0
    would keep it alive), then comes 6 s late to the step's sum. Else every rank runs its own engine (torchrun's
    external launcher), and rank 0 comes 6 s late. What the other rank's sum said, and how long it took."""
    from slimquant.config import EngineConfig
    from slimquant.distributed import workers

    config = EngineConfig("unused", tensor_parallel_size=size, execute_model_timeout=1)
    tp = workers._links(TensorParallel(rank, size), config, offer, follows=follows and rank > 0)
    assert (tp.local is not None) == offer
    if follows:
        time.sleep(2 if rank == 0 and offer else 0)
        tp.broadcast("step" if rank == 0 else None)
    late = 1 if follows else 0
    time.sleep(6 if rank == late else 0)
    start, said = time.monotonic(), "answered"
    try:
        tp.sum(torch.ones(4, dtype=torch.int32))
    except RuntimeError as e:
        said = str(e)
    took = time.monotonic() - start
    workers.close_exchange(tp)
    return said, took


@pytest.mark.parametrize("follows", [True, False], ids=["follower", "own-engine"])
@pytest.mark.parametrize("offer", [True, False], ids=["shared-memory", "gloo"])
def test_a_rank_late_to_a_step_fails_it_after_execute_model_timeout(offer, follows):
    results = run_ranks(_late_to_a_step, 2, offer, follows)
    late = 1 if follows else 0
    said, took = results[1 - late]
    assert 1 <= took < 5, (said, took)
    want = f"rank(s) [{late}] of the tensor-parallel group did not answer" if offer else "timed out"
    assert want in said.lower(), said


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
        workers._attach = lambda tp, name, timeout: None
    tp = workers._share_memory(TensorParallel(rank, size), True)
    shared = tp.local is not None
    if shared:
        tp.local.close(unlink=rank == 0)
    return shared


def test_shared_memory_only_where_every_rank_can_attach():
    assert run_ranks(_links, 3, None) == [True] * 3
    assert run_ranks(_links, 3, 2) == [False] * 3  # one rank elsewhere: gloo for all


def _links_with_free(rank: int, size: int, free: int) -> bool:
    """Whether this rank exchanges through shared memory where /dev/shm has free bytes free."""
    import collections
    import shutil

    from slimquant.distributed import workers

    shutil.disk_usage = lambda folder: collections.namedtuple("usage", "total used free")(free, 0, free)
    tp = workers._share_memory(TensorParallel(rank, size), True)
    if tp.local is not None:
        tp.local.close(unlink=rank == 0)
    return tp.local is not None


def test_no_shared_memory_where_dev_shm_has_no_room():
    assert segment_bytes(2) > 2 * SLOT_BYTES
    assert run_ranks(_links_with_free, 2, segment_bytes(2)) == [True, True]
    assert run_ranks(_links_with_free, 2, segment_bytes(2) - 1) == [False, False]  # would die of SIGBUS: gloo


def _launched_local(rank: int, size: int, path: str) -> bool:
    from slimquant import LLM

    llm = LLM(path, kernels={"backend": "torch-reference"}, max_model_len=64, tensor_parallel_size=size)
    return llm.llm_engine.tp.local is not None


def test_torchrun_style_ranks_on_one_machine_exchange_through_shared_memory(tiny_model):
    assert run_ranks(_launched_local, 2, str(tiny_model("llama"))) == [True, True]
