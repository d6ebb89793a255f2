"""LLM(tensor_parallel_size=N) in a plain process starts ranks 1..N-1 itself (rank 0 schedules and broadcasts each
step): the same tokens and logprobs as one process, bit for bit; a rank that dies or cannot load stops every rank
with an error that names it, within seconds, and leaves no process or process group behind."""

from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from slimquant import LLM, SamplingParams
from slimquant.distributed.launch import run_ranks
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


def test_a_model_that_cannot_split_is_a_value_error_and_leaves_nothing(tiny_model):
    with pytest.raises(ValueError, match="num_key_value_heads = 2 is not divisible by tensor_parallel_size = 4"):
        LLM(str(tiny_model("llama")), tensor_parallel_size=4)
    assert not dist.is_initialized()
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
