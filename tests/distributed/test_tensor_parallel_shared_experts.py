"""GLM-4.5 (shared experts, the biased sigmoid router, rope on half of each head) and Qwen2-MoE (q/k/v biases, a
shared expert scaled by its float gate, whole on every rank) split over ranks, with and without expert parallel:
every rank returns one process's greedy tokens and logprobs, bit for bit, for float, all-W8A8_DYNAMIC and the MoE mix
(attention static, every MLP linear dynamic) checkpoints, on torch-reference and on cpu-native, per op and in the
whole-step native call (the shared experts split like a dense MLP and reduced inside it)."""

from __future__ import annotations

import pytest

from slimquant.distributed.launch import run_ranks
from slimquant.kernels import native
from tests.distributed.test_tensor_parallel_deepseek import (
    assert_native_ranks_match_one_process,
    rank_generate,
    rank_generate_stacked,
)
from tests.distributed.test_tensor_parallel_qwen3_moe import moe_checkpoints


@pytest.fixture(scope="module", params=["glm4_moe", "qwen2_moe"])
def checkpoints(request, tiny_model, tmp_path_factory) -> dict[str, str]:
    return moe_checkpoints(tiny_model, tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def one_process(checkpoints) -> list:
    (outs,) = run_ranks(rank_generate, 1, list(checkpoints.values()), False)
    return outs


@pytest.mark.parametrize("size,expert_parallel", [(2, False), (2, True), (4, True)])
def test_every_rank_returns_one_process_tokens_and_logprobs(checkpoints, one_process, size, expert_parallel):
    for rank, got in enumerate(run_ranks(rank_generate, size, list(checkpoints.values()), expert_parallel)):
        for name, outs, want in zip(checkpoints, got, one_process, strict=True):
            assert outs == want, f"{name}: rank {rank} of {size} (ep={expert_parallel}) differs"


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_native_ranks_return_one_native_process_results(checkpoints):
    """cpu-native ranks (steps per op), their int8 experts split in the experts' native call."""
    assert_native_ranks_match_one_process([checkpoints["W8A8_DYNAMIC"], checkpoints["mix"]])


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_native_ranks_run_the_layers_in_the_whole_step(checkpoints, expert_parallel):
    """2 cpu-native ranks run the decode steps in the whole-step native call: the routed experts split (or whole,
    expert parallel) and the shared experts split, each reduced from inside the call. One process's bits."""
    paths = [checkpoints["W8A8_DYNAMIC"], checkpoints["mix"]]
    ((one, _, one_steps),) = run_ranks(rank_generate_stacked, 1, paths, False)
    assert one_steps > 0
    for rank, (got, notes, steps) in enumerate(run_ranks(rank_generate_stacked, 2, paths, expert_parallel)):
        assert got == one, f"rank {rank} of 2 (ep={expert_parallel}) differs from one process"
        assert steps > 0 and all("reduced across 2 ranks from inside it" in n for n in notes), notes
