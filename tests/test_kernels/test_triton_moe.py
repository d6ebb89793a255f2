"""The grouped MoE kernels (kernels/cuda_moe.py) against one expert at a time in docs/FORMAT.md's math, run by
Triton's interpreter on the CPU (tests/gpu runs them compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("tests/gpu runs these kernels compiled", allow_module_level=True)
pytest.importorskip("triton")
from slimquant.distributed.launch import run_ranks  # noqa: E402
from slimquant.kernels import cuda_moe  # noqa: E402
from tests.test_kernels.moe_reference import moe_inputs, one_expert_at_a_time, rank_split_experts  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "t,e,top_k,h,inter", [(1, 8, 2, 64, 48), (5, 6, 3, 72, 40), (40, 8, 2, 96, 24), (3, 4, 4, 300, 20)]
)
def test_grouped_experts_equal_one_expert_at_a_time(t, e, top_k, h, inter, dtype):
    inputs = moe_inputs(t, e, top_k, h, inter, dtype, seed=t + e + h)
    assert torch.equal(cuda_moe.routed_experts(*inputs), one_expert_at_a_time(*inputs))


@pytest.mark.parametrize("first,local", [(0, 3), (3, 3), (6, 2)])
def test_a_ranks_experts_fill_their_slots_and_zero_the_others(first, local):
    """Expert parallel: experts first .. first + local - 1 of 8 on this rank give the whole layer's values in
    their slots and 0 in the slots other ranks fill."""
    x, w13, s13, w2, s2, weights, ids = moe_inputs(20, 8, 3, 64, 24, torch.bfloat16, seed=first)
    whole = one_expert_at_a_time(x, w13, s13, w2, s2, weights, ids)
    mine = slice(first, first + local)
    got = cuda_moe.routed_experts(x, w13[mine], s13[mine], w2[mine], s2[mine], weights, ids, first)
    here = ((ids >= first) & (ids < first + local))[..., None].expand_as(whole)  # [T, K, H]
    assert here.any() and (~here).any()
    assert torch.equal(got, torch.where(here, whole, torch.zeros_like(whole)))


def test_experts_split_over_ranks_give_the_whole_layers_values():
    """Tensor parallel without expert parallel: two ranks, each with half of every expert's intermediate size, agree
    on each row's activation absmax and sum the int32 down products: one process's values, bit for bit."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for rank, same in enumerate(run_ranks(rank_split_experts, 2, "cpu", dtypes)):
        assert same and all(same), f"rank {rank}: {same}"


@pytest.mark.parametrize("tiles", [cuda_moe.MoeTiles(16, 32, 32), cuda_moe.MoeTiles(32, 64, 64)])
def test_tiles_do_not_change_the_numbers(tiles):
    """Blocks of 16 or 32 rows, K in several blocks, N in several tiles: every slot's value as one expert at a
    time computes it (40 tokens x 3 of 5 experts: experts with more rows than a block)."""
    inputs = moe_inputs(40, 5, 3, 100, 40, torch.bfloat16, seed=7)
    assert torch.equal(cuda_moe.routed_experts(*inputs, tiles=tiles), one_expert_at_a_time(*inputs))


@pytest.mark.parametrize("t,e,top_k,block_m", [(1, 8, 2, 16), (37, 6, 3, 16), (200, 4, 2, 64), (3, 64, 6, 16)])
def test_expert_blocks_cover_every_slot_once(t, e, top_k, block_m):
    ids = torch.rand(t, e, generator=torch.Generator().manual_seed(t)).argsort(dim=-1)[:, :top_k]
    blocks = cuda_moe.expert_blocks(ids, e, block_m)
    flat = ids.reshape(-1)
    assert torch.equal(flat[blocks.order], flat.sort(stable=True).values)  # sorted by expert
    seen = []
    for b in range(blocks.expert.numel()):
        expert, row0, end = int(blocks.expert[b]), int(blocks.row0[b]), int(blocks.end[b])
        if expert < 0:
            continue
        rows = list(range(row0, min(row0 + block_m, end)))
        assert rows, f"block {b} of expert {expert} is empty"
        assert (flat[blocks.order[rows]] == expert).all()
        seen += rows
    assert sorted(seen) == list(range(flat.numel()))


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_deepseek_on_grouped_experts_equals_one_expert_at_a_time(tiny_model, tmp_path, monkeypatch, arch):
    """A bf16 DeepSeek with W8A8_DYNAMIC experts on the cuda-triton ops (a prefill chunk, then decode steps of two
    sequences): the same logits with the grouped kernels, whose input is quantized once for the routed and the shared
    experts, as with each quantizing its own, and as with its experts run one by one."""
    from slimquant.backends.base import Backend
    from slimquant.backends.torch_ops import TorchOps
    from slimquant.backends.triton_ops import TritonOps
    from slimquant.models import loader
    from tests.models.ascend_ckpt import write_ascend
    from tests.models.paged import PROMPT, PagedRunner
    from tests.models.test_model_deepseek_quantized import deepseek_mix

    dst = write_ascend(tiny_model(arch), tmp_path / "q", deepseek_mix, dtype=torch.bfloat16)
    with monkeypatch.context() as patch:  # the cuda-triton backend's ops (and weight form), in Triton's interpreter
        patch.setattr(loader, "select_backend", lambda *args: Backend(TritonOps()))
        model = loader.load_model(str(dst)).model

    def logits() -> torch.Tensor:
        runner = PagedRunner(model, torch.bfloat16)
        steps = [runner.step({0: PROMPT[:7], 1: PROMPT[3:5]})]
        steps += [runner.step({0: [t], 1: [t + 1]}) for t in PROMPT[7:]]
        return torch.cat(steps)

    calls = []
    kernels = cuda_moe.routed_experts
    monkeypatch.setattr(cuda_moe, "routed_experts", lambda *a, **kw: calls.append(1) or kernels(*a, **kw))
    grouped = logits()
    moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    moe_calls = (1 + len(PROMPT[7:])) * moe_layers  # every step's every MoE layer
    assert len(calls) == moe_calls
    quantized = []  # each MoE layer quantizes its input once, for its routed and shared experts both
    monkeypatch.setattr(
        TritonOps, "quantize_input", lambda *a, _q=TritonOps.quantize_input: quantized.append(1) or _q(*a)
    )
    assert torch.equal(grouped, logits()) and len(quantized) == moe_calls
    monkeypatch.setattr(TritonOps, "quantize_input", TorchOps.quantize_input)  # each quantizes its own
    assert torch.equal(grouped, logits())
    monkeypatch.setattr(TritonOps, "grouped_experts", TorchOps.grouped_experts)  # None: one expert at a time
    assert torch.equal(grouped, logits())


def test_bench_layers_run_grouped_and_one_at_a_time():
    """bench/cuda_moe.py's random layers (at a small shape, on the CPU) and its per-expert ops: the same output."""
    import sys
    from pathlib import Path

    from slimquant.backends.triton_ops import TritonOps

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.cuda_moe import route, routed_experts

    loop = TritonOps()
    loop.grouped_experts = lambda *a, **kw: None
    layer = routed_experts(16, True, TritonOps(), device="cpu", hidden=64, inter=32)
    x, (weights, ids) = torch.randn(9, 64).bfloat16(), route(9, 16, device="cpu")
    grouped = layer(x, weights, ids)
    layer.ops = loop
    assert torch.equal(grouped, layer(x, weights, ids))
