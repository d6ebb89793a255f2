"""GLM-4.5 split over ranks, with and without expert parallel: every rank returns one process's greedy tokens and
logprobs, bit for bit, for float, all-W8A8_DYNAMIC and the MoE mix (attention static, every MLP linear dynamic)
checkpoints, on torch-reference and on cpu-native (whose decode attention takes q and k already turned where rope
covers half of each head)."""

from __future__ import annotations

import pytest

from slimquant.distributed.launch import run_ranks
from slimquant.kernels import native
from tests.distributed.test_tensor_parallel_deepseek import rank_generate, rank_generate_native
from tests.distributed.test_tensor_parallel_qwen3_moe import moe_checkpoints


@pytest.fixture(scope="module")
def glm(tiny_model, tmp_path_factory) -> dict[str, str]:
    return moe_checkpoints(tiny_model, tmp_path_factory, "glm4_moe")


@pytest.fixture(scope="module")
def one_process(glm) -> list:
    (outs,) = run_ranks(rank_generate, 1, list(glm.values()), False)
    return outs


@pytest.mark.parametrize("size,expert_parallel", [(2, False), (2, True), (4, True)])
def test_every_rank_returns_one_process_tokens_and_logprobs(glm, one_process, size, expert_parallel):
    for rank, got in enumerate(run_ranks(rank_generate, size, list(glm.values()), expert_parallel)):
        for name, outs, want in zip(glm, got, one_process, strict=True):
            assert outs == want, f"{name}: rank {rank} of {size} (ep={expert_parallel}) differs"


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_native_ranks_return_one_native_process_results(glm):
    """cpu-native ranks (steps per op: partial rotary), their int8 experts split in the experts' native call."""
    paths = [glm["W8A8_DYNAMIC"], glm["mix"]]
    ((one, _),) = run_ranks(rank_generate_native, 1, paths)
    for rank, (got, split_calls) in enumerate(run_ranks(rank_generate_native, 2, paths)):
        assert got == one, f"rank {rank} of 2 differs from one process"
        assert split_calls > 0
