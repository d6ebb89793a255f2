"""The cuda-triton backend's ops under tensor parallel, run by Triton's interpreter on CPU tensors with gloo between
the ranks (tests/gpu runs them compiled): every rank returns one process's greedy tokens and logprobs on the same
ops, bit for bit, for int8 and mixed Llama / Qwen2 checkpoints (the norms quantize for column-parallel linears; a
row-parallel one agrees on each token's absmax first) and DeepSeek-V3 and Qwen3-MoE with and without expert
parallel, their int8 experts in the grouped kernels either way (with it, each rank its own experts; without, its
part of every expert, the ranks reducing between the kernels)."""

from __future__ import annotations

import pytest
import torch

from slimquant.distributed.launch import run_ranks
from tests.distributed.test_tensor_parallel_deepseek import generate
from tests.models.ascend_ckpt import write_ascend
from tests.models.test_model_deepseek_quantized import deepseek_mix
from tests.models.test_model_qwen3_moe import moe_mix

if torch.cuda.is_available():
    pytest.skip("tests/gpu runs these kernels compiled", allow_module_level=True)
pytest.importorskip("triton")


def rank_generate_triton(rank: int, size: int, paths: list[str], expert_parallel: bool) -> tuple[list, list, list]:
    """(generate's result per checkpoint, the ranks over which each grouped MoE call split its experts, whether
    each checkpoint's decode steps ran as graph replays: here their CPU stand-in) on the cuda-triton ops in this
    rank's process."""
    from slimquant.backends.base import Backend
    from slimquant.backends.triton_ops import TritonOps
    from slimquant.kernels import cuda_moe
    from slimquant.models import loader

    backends: list[Backend] = []
    loader.select_backend = lambda *args: backends.append(Backend(TritonOps(), graphs=True)) or backends[-1]
    grouped, calls = cuda_moe.routed_experts, []
    cuda_moe.routed_experts = lambda *a, tp: calls.append(tp.size) or grouped(*a, tp=tp)
    outs = [generate(p, tensor_parallel_size=size, enable_expert_parallel=expert_parallel) for p in paths]
    return outs, calls, [bool(b.graphs and b.graphs.graphs) for b in backends]


@pytest.fixture(scope="module")
def models(checkpoints, tiny_model, tmp_path_factory) -> dict[str, str]:
    names = ("llama-W8A8_DYNAMIC", "llama-W8A8", "qwen2-mixed")
    deepseek = write_ascend(tiny_model("deepseek_v3"), tmp_path_factory.mktemp("v3-mix"), deepseek_mix)
    qwen3_moe = write_ascend(tiny_model("qwen3_moe"), tmp_path_factory.mktemp("qwen3-moe-mix"), moe_mix)
    return {name: checkpoints[name] for name in names} | {"deepseek-v3-mix": str(deepseek), "qwen3-moe": str(qwen3_moe)}


@pytest.fixture(scope="module")
def one_process(models) -> list:
    ((outs, calls, graphed),) = run_ranks(rank_generate_triton, 1, list(models.values()), False)
    assert calls and set(calls) == {1} and all(graphed)  # one process runs the MoE experts grouped
    return outs


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_ranks_on_triton_ops_return_one_process_tokens_and_logprobs(models, one_process, expert_parallel):
    one = one_process
    runs = run_ranks(rank_generate_triton, 2, list(models.values()), expert_parallel)
    for rank, (got, calls, graphed) in enumerate(runs):
        assert calls and set(calls) == {1 if expert_parallel else 2}  # grouped: whole experts, or split ones
        assert graphed == [True] * len(models)  # no host values in any step (CUDA runs TP steps eagerly, though)
        for name, outs, want in zip(models, got, one, strict=True):
            assert outs == want, f"{name}: rank {rank} of 2 (ep={expert_parallel}) differs from one process"
