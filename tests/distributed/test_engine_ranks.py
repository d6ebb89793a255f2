"""LLM(tensor_parallel_size=N) in a plain process starts ranks 1..N-1 itself (rank 0 schedules and broadcasts each
step): the same tokens and logprobs as one process, bit for bit; a rank that dies or cannot load stops every rank
with an error that names it, within seconds, and leaves no process or process group behind."""

from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import re
import threading
import time

import pytest
import torch.distributed as dist

from slimquant import LLM, SamplingParams
from slimquant.config import EngineConfig
from slimquant.distributed.launch import run_ranks
from slimquant.distributed.nodes import NodeWatch, store_client, tell_node_0
from slimquant.distributed.tensor_parallel import TensorParallel
from slimquant.distributed.workers import WorkerGroup, free_port
from slimquant.errors import RankFailure
from tests.distributed.test_tensor_parallel import PARAMS, PROMPTS, rank_generate

SIZE = 2
THREADS = max(1, (os.cpu_count() or 1) // SIZE)  # what the engine gives each rank: the reference runs alike


def _llm(path: str) -> LLM:
    return LLM(path, tensor_parallel_size=SIZE, kernels={"backend": "torch-reference"}, max_model_len=64)


def test_engine_started_ranks_return_one_process_results(checkpoints):
    names = ["llama-W8A8_DYNAMIC", "qwen2-mixed", "qwen3-float", "llama-W8A8"]
    paths = [checkpoints[n] for n in names]
    (one,) = run_ranks(rank_generate, 1, paths, threads=THREADS)
    for name, path, want in zip(names, paths, one, strict=True):
        llm = _llm(path)
        try:
            outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
        finally:
            llm.llm_engine.shutdown()
        got = [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]
        assert got == want, name
        assert not dist.is_initialized()


def test_a_rank_that_dies_stops_the_engine_naming_it(checkpoints):
    llm = _llm(checkpoints["llama-W8A8"])
    workers = llm.llm_engine.workers
    workers.procs[0].kill()
    workers.procs[0].join()
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] of 2 failed \(rank 1 exited with code -9"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.perf_counter() - start < 30
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers.procs)


def test_rank_0_failing_inside_a_step_stops_every_rank(checkpoints):
    """The other ranks are left inside the step's collectives: a later step would pair its broadcast with them."""
    llm = _llm(checkpoints["llama-W8A8"])
    engine, workers = llm.llm_engine, llm.llm_engine.workers
    forward, calls = engine.runner.backend.forward, []

    def fails_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in rank 0's forward")
        return forward(*args)

    engine.runner.backend.forward = fails_on_the_third
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"rank 0 failed inside a step .*boom in rank 0's forward.*cannot go on"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.perf_counter() - start < 30
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers.procs)


def test_a_model_that_cannot_split_is_a_value_error_and_leaves_nothing(tiny_model):
    with pytest.raises(ValueError, match="tensor_parallel_size = 3 is not a multiple of num_key_value_heads = 2"):
        LLM(str(tiny_model("llama", hidden_size=96, num_attention_heads=6)), tensor_parallel_size=3)
    assert not dist.is_initialized()
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def _exits_at_once() -> None:
    raise SystemExit(1)


def _group_of_a_dead_rank() -> WorkerGroup:
    proc = multiprocessing.get_context("spawn").Process(target=_exits_at_once)
    proc.start()
    proc.join()
    return WorkerGroup([proc], None, TensorParallel(rank=0, size=2), ranks=[1])


def _exits_later(code: int) -> None:
    time.sleep(1.0)
    os._exit(code)


def _watched_rank(code: int) -> tuple[WorkerGroup, threading.Event]:
    """A group whose rank 1 exits with code in a second, watched as on GPUs, and the event its abort sets."""
    proc = multiprocessing.get_context("spawn").Process(target=_exits_later, args=(code,))
    proc.start()
    group, aborted = WorkerGroup([proc], None, TensorParallel(rank=0, size=2), ranks=[1]), threading.Event()
    group.watch(aborted.set)
    return group, aborted


def test_on_gpus_a_rank_that_dies_mid_step_aborts_the_nccl_group_and_the_step_fails_in_seconds():
    """NCCL waits for a dead peer until its timeout (execute_model_timeout): the step here waits so until the
    abort ends it, and its (void) result must not be taken."""
    group, aborted = _watched_rank(3)
    start = time.perf_counter()
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] of 2 failed \(rank 1 exited with code 3"):
        group.guard(aborted.wait, 60)
    assert aborted.is_set() and time.perf_counter() - start < 10


class _ExitCodeComesLate:
    """A rank whose sentinel is ready (its process closed its files while exiting) before its exit code can be
    read, as happens for a moment on a busy machine."""

    def __init__(self, code: int):
        self.sentinel, write_end = os.pipe()
        os.close(write_end)
        self.exitcode, self._code = None, code

    def join(self, timeout: float | None = None) -> None:
        self.exitcode = self._code


def test_a_rank_whose_exit_code_comes_late_is_seen_dead_not_stopped():
    """The watch read a dead rank as told to stop (exit code 0 or none yet) when its exit code came after its
    sentinel: it then ended without aborting the step (once in a suite run on a loaded machine)."""
    rank = _ExitCodeComesLate(3)
    group = WorkerGroup([rank], None, TensorParallel(rank=0, size=2), ranks=[1])
    try:
        assert group._first_failure() == "rank(s) [1] died"
    finally:
        os.close(rank.sentinel)


def _node_0_of_two(**settings) -> tuple[dist.TCPStore, EngineConfig, WorkerGroup]:
    """Node 0's TCPStore on a free port, node 1's config for it (with settings), and a rank-0 group that reads the
    other node's notes and beats there (no ranks of its own)."""
    from datetime import timedelta

    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    config = EngineConfig.from_kwargs(
        "unused", master_port=port, nnodes=2, node_rank=1, tensor_parallel_size=2, **settings
    )
    group = WorkerGroup([], None, TensorParallel(rank=0, size=2), ranks=[])
    group._nodes = NodeWatch(store_client(config), config)
    return master, config, group


def test_on_gpus_a_note_from_another_node_aborts_the_nccl_group_and_names_its_ranks():
    """A node whose rank died tells node 0 through its TCPStore (run_headless); rank 0's collectives would wait for
    that rank until NCCL's timeout."""
    master, config, group = _node_0_of_two()
    aborted = threading.Event()
    group.watch(aborted.set)
    note = "rank(s) [1] on node 1 failed (rank 1 exited with code -9)"
    threading.Timer(1.0, tell_node_0, (config, note)).start()
    with pytest.raises(RankFailure, match=re.escape(note)):
        group.guard(aborted.wait, 60)
    assert aborted.is_set()
    del master


def test_on_gpus_a_node_that_stops_beating_aborts_the_nccl_group_in_node_timeout():
    """A machine gone without closing its connections leaves no note: its beats stop (serve_tp's tests run it
    whole, on gloo)."""
    master, _, group = _node_0_of_two(node_timeout=1.5)
    aborted = threading.Event()
    start = time.perf_counter()
    group.watch(aborted.set)
    with pytest.raises(RankFailure, match=r"its node is lost.*node 1 stopped answering: no heartbeat in node_tim"):
        group.guard(aborted.wait, 60)
    assert 1.5 < time.perf_counter() - start < 5
    del master


def test_ranks_that_exit_as_told_are_not_aborted():
    group, aborted = _watched_rank(0)
    group.procs[0].join()
    assert not aborted.wait(1.0) and group.guard(len, "ok") == 2
    group, aborted = _watched_rank(3)
    group.kill()  # the engine stops its ranks
    assert not aborted.wait(1.5)


def _value_error() -> None:
    raise ValueError("num_attention_heads = 4 is not divisible by tensor_parallel_size = 3")


def test_rank_0s_value_error_while_loading_is_raised_as_it_is_though_the_ranks_died_of_it_too():
    """Every rank fails to split the model; whether the others are seen dead yet must not change rank 0's error (a
    race before: a ValueError, or a RankFailure when they had exited within guard's 0.5 s). In a step, a dead rank
    makes any failure a RankFailure."""
    with pytest.raises(ValueError, match="num_attention_heads = 4"):
        _group_of_a_dead_rank().guard_load(_value_error)
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] of 2 failed \(rank 1 exited with code 1"):
        _group_of_a_dead_rank().guard(_value_error)


def test_what_several_ranks_said_alike_is_said_once():
    group = _group_of_a_dead_rank()
    group.errors = queue.Queue()
    for rank, text in [(2, "ValueError: x"), (1, "ValueError: x"), (3, "MemoryError")]:
        group.errors.put((rank, text))
    assert group._errors() == "ranks 1, 2: ValueError: x rank 3: MemoryError"


STRESS = dict(max_num_batched_tokens=16, num_kv_blocks=10, block_size=8, max_num_seqs=4)  # chunks, preemption
LONG_PROMPTS = [f"{i} The quick brown fox jumps over the lazy dog, again and again" for i in range(4)]


def _stress(rank: int, size: int, path: str) -> list:
    """Sampled (n=2, seeded and unseeded) completions under chunked prefill and preemption."""
    llm = LLM(path, tensor_parallel_size=size, kernels={"backend": "torch-reference"}, max_model_len=64, **STRESS)
    params = [SamplingParams(temperature=0.8, n=2, max_tokens=12, seed=s, ignore_eos=True) for s in (7, None, 9, None)]
    outs = llm.generate(LONG_PROMPTS, params, use_tqdm=False)
    preempted = llm.llm_engine.scheduler.num_preemptions
    if size > 1 and llm.llm_engine.workers is not None:
        llm.llm_engine.shutdown()
    return [[c.token_ids for c in o.outputs] for o in outs], preempted


def test_sampling_chunked_prefill_and_preemption_match_one_process(checkpoints):
    path = checkpoints["qwen3-W8A8_DYNAMIC"]
    (want,) = run_ranks(_stress, 1, path, threads=THREADS)
    got = _stress(0, SIZE, path)
    assert want[1] > 0, "the settings must force preemption"
    assert got == want


def test_an_engine_dropped_without_shutdown_stops_its_ranks(checkpoints):
    llm = _llm(checkpoints["llama-float"])
    procs = llm.llm_engine.workers.procs
    del llm
    gc.collect()
    assert not dist.is_initialized() and not any(p.is_alive() for p in procs)
    llm = _llm(checkpoints["llama-float"])  # a new group, new ranks
    try:
        assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.llm_engine.shutdown()
