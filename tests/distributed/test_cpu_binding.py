"""cpu_threads_bind (vLLM's VLLM_CPU_OMP_THREADS_BIND): "auto" gives each rank on a machine a contiguous group of
its cores, "0-3|4-7" names them, "all" binds nothing; bad specs are ValueErrors naming what is wrong; the ranks an
engine starts run on their cores, and the engine's process gets its cores back at shutdown."""

from __future__ import annotations

import os

import psutil
import pytest

from slimquant import LLM, SamplingParams
from slimquant.config import EngineConfig
from slimquant.distributed.cpu_binding import core_groups, parse_core_list


def test_core_lists_parse():
    assert parse_core_list("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_core_list("5") == [5]
    for bad in ("", "a", "3-1", "0-", "1,,2"):
        with pytest.raises(ValueError, match="core list"):
            parse_core_list(bad)


def test_auto_splits_the_allowed_cores_in_contiguous_groups():
    assert core_groups("auto", 2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
    assert core_groups("auto", 3, [4, 5, 6, 7, 8, 9]) == [[4, 5], [6, 7], [8, 9]]
    assert core_groups("auto", 3, [0, 1]) is None  # fewer cores than ranks: nothing bound
    assert core_groups("all", 2, [0, 1]) is None


def test_named_groups_are_checked():
    assert core_groups("0|1", 2, [0, 1]) == [[0], [1]]
    with pytest.raises(ValueError, match=r"cores \[5\] are not available"):
        core_groups("0|5", 2, [0, 1])
    with pytest.raises(ValueError, match="names 1 core sets for 2 ranks"):
        EngineConfig(model="m", tensor_parallel_size=2, cpu_threads_bind="0-1")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to give each rank one")
def test_engine_ranks_run_on_their_cores(checkpoints):
    before = os.sched_getaffinity(0)
    want = core_groups("auto", 2)
    llm = LLM(checkpoints["llama-W8A8"], tensor_parallel_size=2, cpu_threads_bind="auto", max_model_len=64)
    try:
        assert sorted(os.sched_getaffinity(0)) == want[0]
        (rank1,) = llm.llm_engine.workers.procs
        assert sorted(psutil.Process(rank1.pid).cpu_affinity()) == want[1]
        assert llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.llm_engine.shutdown()
    assert os.sched_getaffinity(0) == before
