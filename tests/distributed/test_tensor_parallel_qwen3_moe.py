"""Qwen3-MoE split over ranks, with and without expert parallel: every rank returns one process's greedy tokens and
logprobs, bit for bit, for float, all-W8A8_DYNAMIC and the quantizer's w8a8 mix (attention static, experts and
down_proj dynamic) checkpoints, on torch-reference and on cpu-native (whose int8 experts split over the ranks run
in its one native call)."""

from __future__ import annotations

import pytest

from slimquant.distributed.launch import run_ranks
from slimquant.kernels import native
from tests.distributed.test_tensor_parallel_deepseek import (
    assert_native_ranks_match_one_process,
    rank_generate,
    rank_generate_stacked,
)
from tests.models.ascend_ckpt import write_ascend
from tests.models.test_model_qwen3_moe import moe_mix


def moe_checkpoints(tiny_model, tmp_path_factory, arch: str) -> dict[str, str]:
    """name -> folder: float, W8A8_DYNAMIC and the w8a8 mix of one tiny MoE model of arch with 4 kv heads (4
    ranks)."""
    src = tiny_model(arch, num_key_value_heads=4)
    out = {"float": str(src)}
    for name, kind in (("W8A8_DYNAMIC", lambda p: "W8A8_DYNAMIC"), ("mix", moe_mix)):
        out[name] = str(write_ascend(src, tmp_path_factory.mktemp(f"{arch}-{name}"), kind))
    return out


@pytest.fixture(scope="module")
def qwen3_moe(tiny_model, tmp_path_factory) -> dict[str, str]:
    return moe_checkpoints(tiny_model, tmp_path_factory, "qwen3_moe")


@pytest.fixture(scope="module")
def one_process(qwen3_moe) -> dict[str, list]:
    (outs,) = run_ranks(rank_generate, 1, list(qwen3_moe.values()), False)
    return dict(zip(qwen3_moe, outs, strict=True))


@pytest.mark.parametrize("size,expert_parallel", [(2, False), (2, True), (4, False), (4, True)])
def test_every_rank_returns_one_process_tokens_and_logprobs(qwen3_moe, one_process, size, expert_parallel):
    ranks = run_ranks(rank_generate, size, list(qwen3_moe.values()), expert_parallel)
    for rank, got in enumerate(ranks):
        for name, outs in zip(qwen3_moe, got, strict=True):
            assert outs == one_process[name], f"{name}: rank {rank} of {size} (ep={expert_parallel}) differs"


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_native_ranks_return_one_native_process_results(qwen3_moe):
    """cpu-native ranks, their int8 experts split: where a step runs per op, the split experts run in the experts'
    native call, which reduces from inside it; one process's bits."""
    assert_native_ranks_match_one_process([qwen3_moe["W8A8_DYNAMIC"], qwen3_moe["mix"]])


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
@pytest.mark.parametrize("size,expert_parallel", [(2, False), (2, True), (4, True)])
def test_native_ranks_run_moe_layers_in_the_whole_step(qwen3_moe, size, expert_parallel):
    """cpu-native ranks run their decode steps in the whole-step native call, MoE layers included: each rank's part
    of every expert, the absmax and int32 products reduced from inside the call, or (expert parallel) its whole
    experts, the weighted products swapped and added in expert order. One process's bits. (4 ranks without expert
    parallel would hold 8 intermediate rows of each expert, off the int8 row blocks: those run per op.)"""
    paths = [qwen3_moe["W8A8_DYNAMIC"], qwen3_moe["mix"]]
    ((one, _, one_steps),) = run_ranks(rank_generate_stacked, 1, paths, False)
    assert one_steps > 0
    for rank, (got, notes, steps) in enumerate(run_ranks(rank_generate_stacked, size, paths, expert_parallel)):
        assert got == one, f"rank {rank} of {size} (ep={expert_parallel}) differs from one process"
        assert steps > 0 and all(f"reduced across {size} ranks from inside it" in n for n in notes), notes
