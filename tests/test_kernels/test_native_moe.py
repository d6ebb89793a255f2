"""NativeOps.grouped_experts (csrc/moe_cpu.cpp: a MoE layer's routed W8A8_DYNAMIC experts in one call) against
the native per-op path RoutedExperts runs expert by expert, bit for bit, and against TorchOps' math; summed (each
token's products added in the call, in expert order) against add_in_expert_order of its slots, bit for bit.
NativeOps.softmax_topk and biased_group_topk (the native routers) against float64 references and TorchOps'."""

from __future__ import annotations

import pytest
import torch

from slimquant.backends.native_ops import NativeOps
from slimquant.backends.torch_ops import TorchOps, add_in_expert_order
from slimquant.distributed.launch import run_ranks
from slimquant.kernels import native
from tests.test_kernels.moe_reference import moe_inputs, rank_part

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
kernels = NativeOps(native.load()) if native.available() else None


def one_by_one(ops: TorchOps, x, w13, s13, w2, s2, weights, ids, first: int = 0) -> torch.Tensor:
    """[T, K, H]: ops' dynamic linears and SiLU-and-mul one expert at a time, as RoutedExperts runs them where
    they are not grouped (0 in the slots of experts other than first .. first + E - 1)."""
    out = torch.zeros(*ids.shape, x.shape[1])
    for e in range(w13.shape[0]):
        tokens, slots = torch.where(ids == first + e)
        if len(tokens):
            act = ops.silu_and_mul(ops.dynamic_linear(x[tokens], w13[e], s13[e].float(), None, x.dtype))
            y = ops.dynamic_linear(act, w2[e], s2[e].float(), None, x.dtype)  # [n, H]
            out[tokens, slots] = y * weights[tokens, slots, None]
    return out


def packed(ops: TorchOps, x, w13, s13, w2, s2, weights, ids):
    """moe_inputs with fp32 activations and the weights in ops' runtime form (-128 clamped: the native kernels take
    symmetric weights, as ModelSlim writes them)."""
    w13, w2 = w13.clamp(min=-127), w2.clamp(min=-127)
    return x.float(), ops.pack_weight(w13), s13, ops.pack_weight(w2), s2, weights, ids


SHAPES = [(1, 8, 2, 64, 48), (5, 6, 3, 72, 40), (40, 8, 2, 96, 24), (3, 4, 4, 300, 20), (70, 16, 6, 128, 96)]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,e,top_k,h,inter", SHAPES)
def test_one_call_equals_the_per_op_path_and_torch_math(t, e, top_k, h, inter, scale_dtype):
    """Decode and prefill sizes, hidden and intermediate sizes off the 64-byte padding, scales in fp32 or in the
    model dtype the NPU holds them in: the per-op path's bits; TorchOps' numbers up to the roundings of the
    re-quantized activation (its SiLU runs in float64)."""
    raw = moe_inputs(t, e, top_k, h, inter, scale_dtype, seed=t + e + h)
    inputs = packed(kernels, *raw)
    got = kernels.grouped_experts(*inputs)
    assert got is not None and got.shape == (t, top_k, h)
    assert torch.equal(got, one_by_one(kernels, *inputs))
    ids = inputs[-1]
    assert torch.equal(kernels.grouped_experts(*inputs, summed=True), add_in_expert_order(got, ids))  # [T, H]
    torch_math = one_by_one(TorchOps(), *packed(TorchOps(), *raw))
    assert (got - torch_math).abs().max() <= 0.02 * torch_math.abs().max()


@pytest.mark.parametrize("first,local", [(0, 3), (3, 3), (6, 2)])
def test_a_ranks_experts_fill_their_slots_and_zero_the_others(first, local):
    """Expert parallel: experts first .. first + local - 1 of 8 on this rank give the whole layer's values in
    their slots and 0 in the slots other ranks fill."""
    x, w13, s13, w2, s2, weights, ids = packed(kernels, *moe_inputs(20, 8, 3, 64, 24, torch.bfloat16, seed=first))
    whole = kernels.grouped_experts(x, w13, s13, w2, s2, weights, ids)
    mine = slice(first, first + local)
    got = kernels.grouped_experts(x, w13[mine], s13[mine], w2[mine], s2[mine], weights, ids, first)
    here = ((ids >= first) & (ids < first + local))[..., None].expand_as(whole)  # [T, K, H]
    assert here.any() and (~here).any()
    assert torch.equal(got, torch.where(here, whole, torch.zeros_like(whole)))


def rank_split_experts(rank: int, size: int) -> list[bool]:
    """Whether this rank's part of every expert (its gate / up rows and down columns of inter / size) gives the
    whole layer's values in the one native call, which calls the ranks' collectives back (gloo), per shape and
    scale dtype."""
    from slimquant.distributed.tensor_parallel import TensorParallel

    ops, tp, same = NativeOps(native.load()), TensorParallel.from_default_group(size), []
    for t, e, top_k, h, inter in SHAPES:
        for scale_dtype in (torch.float32, torch.bfloat16):
            x, w13, s13, w2, s2, weights, ids = moe_inputs(t, e, top_k, h, inter, scale_dtype, seed=t + e + h)
            whole = ops.grouped_experts(*packed(ops, x, w13, s13, w2, s2, weights, ids))
            rows, cols = rank_part(rank, size, inter)
            mine = packed(ops, x, w13[:, rows], s13[:, rows], w2[..., cols], s2, weights, ids)
            same.append(torch.equal(ops.grouped_experts(*mine, None, tp), whole))
            summed = ops.grouped_experts(*mine, None, tp, summed=True)  # [T, H]
            same.append(torch.equal(summed, add_in_expert_order(whole, ids)))
    return same


def test_experts_split_over_ranks_give_the_whole_layers_values():
    """Tensor parallel without expert parallel: two ranks agree on each row's activation absmax and sum the int32
    down products from inside the native call: one process's values, bit for bit."""
    for rank, same in enumerate(run_ranks(rank_split_experts, 2)):
        assert same and all(same), f"rank {rank}: {same}"


def test_a_collective_that_fails_inside_the_experts_call_raises_its_error():
    """A collective that fails (a dead rank) ends the call with its error, and no other collective is called."""
    from tests.distributed.test_tensor_parallel import _FailingCollectives

    inputs = packed(kernels, *moe_inputs(4, 4, 2, 64, 32, torch.float32))
    failing = _FailingCollectives(0, 2)
    failing.calls.clear()
    with pytest.raises(RuntimeError, match="stopped answering"):
        kernels.grouped_experts(*inputs, None, failing)
    assert failing.calls == ["max"]


def test_other_inputs_run_one_by_one():
    """bf16 activations, fp16 scales, or TorchOps' weight form: None (RoutedExperts then runs its experts one by
    one)."""
    x, w13, s13, w2, s2, weights, ids = packed(kernels, *moe_inputs(4, 4, 2, 64, 32, torch.bfloat16))
    assert kernels.grouped_experts(x, w13, s13, w2, s2, weights, ids) is not None
    assert kernels.grouped_experts(x.bfloat16(), w13, s13, w2, s2, weights, ids) is None
    assert kernels.grouped_experts(x, w13, s13.half(), w2, s2.half(), weights, ids) is None
    torch_form = TorchOps().pack_weight(w13)
    assert kernels.grouped_experts(x, torch_form, s13, w2, s2, weights, ids) is None


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_deepseek_on_the_cpu_native_backend_gives_the_per_expert_logits(tiny_model, tmp_path, monkeypatch, arch):
    """A DeepSeek with W8A8_DYNAMIC experts on the default CPU backend (a prefill chunk, then decode steps of two
    sequences): every MoE layer's routed experts in one native call, the same logits as expert by expert."""
    from slimquant.models.loader import load_model
    from tests.models.ascend_ckpt import write_ascend
    from tests.models.paged import PROMPT, PagedRunner
    from tests.models.test_model_deepseek_quantized import deepseek_mix

    loaded = load_model(str(write_ascend(tiny_model(arch), tmp_path / "q", deepseek_mix)))
    assert loaded.backend.name == "cpu-native"
    loaded.backend.stack = None  # decode per op (the whole-step call routes and runs the experts itself)

    def logits() -> torch.Tensor:
        runner = PagedRunner.of(loaded, torch.float32)
        steps = [runner.step({0: PROMPT[:7], 1: PROMPT[3:5]})]
        steps += [runner.step({0: [t], 1: [t + 1]}) for t in PROMPT[7:]]
        return torch.cat(steps)

    calls, one_call = [], NativeOps.grouped_experts

    def counted(*args, **kwargs):
        calls.append(one_call(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(NativeOps, "grouped_experts", counted)
    grouped = logits()
    config = loaded.model.config
    assert len(calls) == (1 + len(PROMPT[7:])) * (config.num_hidden_layers - config.first_k_dense_replace)
    assert all(c is not None for c in calls)
    monkeypatch.setattr(NativeOps, "grouped_experts", TorchOps.grouped_experts)  # None: one expert at a time
    assert torch.equal(grouped, logits())


def reference_route(x, weight, top_k: int, renormalize: bool, scaling: float, n_group: int = 1, topk_group: int = 1):
    """Softmax top-k routing in float64, ties to the lower id, among each row's topk_group groups (of n_group) with
    the best top score: (weights fp64 [T, K], ids [T, K])."""
    scores = (x.double() @ weight.double().T).softmax(dim=-1)  # [T, E]
    per_group, rows = weight.shape[0] // n_group, []
    for row in scores.tolist():
        best = [max(row[g * per_group : (g + 1) * per_group]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-best[g], g))[:topk_group]
        allowed = [e for e in range(len(row)) if e // per_group in groups]
        rows.append(sorted(allowed, key=lambda e: (-row[e], e))[:top_k])
    ids = torch.tensor(rows)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling, ids


@pytest.mark.parametrize("renormalize, scaling", [(True, 1.0), (False, 1.0), (True, 2.5)])
@pytest.mark.parametrize("t, e, top_k, h", [(1, 8, 2, 64), (7, 128, 8, 200), (33, 16, 6, 72), (200, 64, 8, 96)])
def test_softmax_router_routes_as_the_float64_reference(t, e, top_k, h, renormalize, scaling):
    """The native router (csrc/moe_cpu.cpp: the pieces the decoder stack routes with) picks the reference's experts
    in its order, with weights within fp32 rounding, as TorchOps' router does; rows of a strided view too; above
    NATIVE_MAX_TOKENS rows (200) from BLAS's logits."""
    gen = torch.Generator().manual_seed(t + e)
    x = torch.randn(t, h + 3, generator=gen)[:, :h]  # rows h + 3 apart
    weight = torch.randn(e, h, generator=gen) / h**0.5
    want_w, want_ids = reference_route(x, weight, top_k, renormalize, scaling)
    for ops in (kernels, TorchOps()):
        got_w, got_ids = ops.softmax_topk(x, weight, top_k, renormalize, scaling)
        assert got_w.dtype == torch.float32 and torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w.double(), want_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t, e, n_group, topk_group, top_k", [(9, 8, 2, 1, 2), (33, 64, 8, 3, 6), (200, 32, 4, 4, 4)])
def test_group_limited_router_routes_as_the_float64_reference(t, e, n_group, topk_group, top_k):
    """DeepSeek-V2's group_limited_greedy (each group scored by its best expert; topk_group = n_group limits
    nothing) through TopkRouter on the native call (the decoder stack's router) and on TorchOps: the reference's
    experts, weights within fp32 rounding; above NATIVE_MAX_TOKENS rows (200) from BLAS's logits."""
    from slimquant.layers.moe import TopkRouter
    from slimquant.random_models import tiny_config

    config = tiny_config(
        "deepseek_v2", n_routed_experts=e, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k
    )
    router = TopkRouter(config)
    assert router.plain_softmax and router.groups == (n_group, topk_group)
    router.weight.data = torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(3))
    x = torch.randn(t, config.hidden_size, generator=torch.Generator().manual_seed(4))
    want_w, want_ids = reference_route(x, router.weight, top_k, True, router.scaling, n_group, topk_group)
    for ops in (kernels, TorchOps()):
        router.ops = ops
        weights, ids = router(x)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights.double(), want_w, rtol=1e-5, atol=1e-7)


def test_a_greedy_router_ignores_the_configs_groups():
    """topk_method greedy with n_group / topk_group in the config (DeepSeek-V2-Lite's): no group limit."""
    from slimquant.layers.moe import TopkRouter
    from slimquant.random_models import tiny_config

    router = TopkRouter(tiny_config("deepseek_v2", topk_method="greedy", n_group=2, topk_group=1))
    assert router.plain_softmax and router.groups == (1, 1)


@pytest.mark.parametrize("t, h", [(1, 64), (9, 200), (130, 72)])
def test_shared_expert_gate_is_the_float64_sigmoid(t, h):
    """Qwen2-MoE's gate sigmoid(x @ w^T) [T, 1]: the native call (the decoder stack's) and TorchOps' within fp32
    rounding of the float64 value, on rows of a strided view; bf16 rows take TorchOps' bf16 math."""
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, h + 5, generator=gen)[:, :h]  # rows h + 5 apart
    w = torch.randn(1, h, generator=gen) / h**0.5
    want = torch.sigmoid(x.double() @ w.double().T)  # [T, 1]
    for ops in (kernels, TorchOps()):
        got = ops.shared_gate(x, w)
        assert got.shape == (t, 1) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.equal(kernels.shared_gate(x.bfloat16(), w), TorchOps().shared_gate(x.bfloat16(), w))


def test_softmax_router_breaks_ties_to_the_lower_id():
    x = torch.ones(2, 16)
    weight = torch.zeros(6, 16)
    weight[[1, 4], 0] = 1.0  # experts 1 and 4 tie above the rest, which tie below
    weights, ids = kernels.softmax_topk(x, weight, 3, True, 1.0)
    assert ids.tolist() == [[1, 4, 0]] * 2
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2))


def test_softmax_router_other_inputs_run_in_torch():
    """bf16 rows (a bf16 float model): TorchOps' router, on the rows as they are."""
    x, weight = torch.randn(3, 32).bfloat16(), torch.randn(8, 32)
    got = kernels.softmax_topk(x, weight, 2, True, 1.0)
    want = TorchOps().softmax_topk(x, weight, 2, True, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def reference_biased_route(x, weight, bias, n_group: int, topk_group: int, top_k: int, renormalize: bool, scaling):
    """DeepSeek-V3's routing in float64, ties to the lower group / id: (weights fp64 [T, K], ids [T, K]); a
    group's score is the sum of its two best choices."""
    scores = torch.sigmoid(x.double() @ weight.double().T)  # [T, E]
    per_group, rows = weight.shape[0] // n_group, []
    for c in (scores + bias.double()).tolist():  # each row's choices
        group_score = [sum(sorted(c[g * per_group : (g + 1) * per_group])[-2:]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        allowed = [e for e in range(len(c)) if e // per_group in groups]
        rows.append(sorted(allowed, key=lambda e: (-c[e], e))[:top_k])
    ids = torch.tensor(rows)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling, ids


@pytest.mark.parametrize("renormalize, scaling", [(True, 2.5), (False, 1.0)])
@pytest.mark.parametrize(
    "t, e, top_k, h, n_group, topk_group",
    [(1, 8, 2, 64, 1, 1), (7, 256, 8, 200, 8, 4), (33, 16, 6, 72, 4, 2), (5, 128, 8, 96, 1, 1), (200, 64, 6, 96, 4, 2)],
)
def test_biased_router_routes_as_the_float64_reference(t, e, top_k, h, n_group, topk_group, renormalize, scaling):
    """The native biased sigmoid router (DeepSeek-V3's 256 experts in 8 groups, GLM-4.5's 128 in one) picks the
    reference's experts in its order, with weights within fp32 rounding, as TorchOps' router does; strided rows."""
    gen = torch.Generator().manual_seed(t + e)
    x = torch.randn(t, h + 3, generator=gen)[:, :h]  # rows h + 3 apart
    weight, bias = torch.randn(e, h, generator=gen) / h**0.5, torch.randn(e, generator=gen) * 0.3
    want_w, want_ids = reference_biased_route(x, weight, bias, n_group, topk_group, top_k, renormalize, scaling)
    for ops in (kernels, TorchOps()):
        got_w, got_ids = ops.biased_group_topk(x, weight, bias, n_group, topk_group, top_k, renormalize, scaling)
        assert got_w.dtype == torch.float32 and torch.equal(got_ids, want_ids), type(ops).__name__
        torch.testing.assert_close(got_w.double(), want_w, rtol=1e-5, atol=1e-7)


def test_biased_router_breaks_ties_to_the_lower_group_and_id():
    """Equal group scores: the lower group; equal choices: the lower id; the bias picks, the scores weigh."""
    x, weight = torch.ones(2, 16), torch.zeros(8, 16)  # every score sigmoid(0) = 0.5
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # groups of 2: group 3 best, then 0, 1, 2 tie
    weights, ids = kernels.biased_group_topk(x, weight, bias, 4, 2, 3, False, 1.0)
    assert ids.tolist() == [[7, 0, 1]] * 2 and weights.tolist() == [[0.5] * 3] * 2


def test_biased_router_other_inputs_run_in_torch():
    x, weight, bias = torch.randn(3, 32).bfloat16(), torch.randn(8, 32), torch.randn(8)
    got = kernels.biased_group_topk(x, weight, bias, 2, 1, 2, True, 1.0)
    want = TorchOps().biased_group_topk(x, weight, bias, 2, 1, 2, True, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("h", [64, 72, 100, 200])
def test_a_row_routes_alike_alone_and_in_a_batch(h):
    """The native routers' logits come in blocks of rows (four rows share each router load): a row's route, bit for
    bit, whether it comes alone (a decode step) or among 37 (a prefill chunk), for hidden sizes with every tail."""
    gen = torch.Generator().manual_seed(h)
    x, weight, bias = torch.randn(37, h, generator=gen), torch.randn(24, h, generator=gen), torch.randn(24) * 0.1
    routes = {
        "softmax": lambda rows: kernels.softmax_topk(rows, weight, 4, True, 1.0),
        "biased": lambda rows: kernels.biased_group_topk(rows, weight, bias, 4, 2, 4, True, 2.5),
    }
    for name, route in routes.items():
        batch = route(x)
        alone = [route(x[i : i + 1]) for i in range(x.shape[0])]
        for part, got in enumerate(batch):
            assert torch.equal(got, torch.cat([a[part] for a in alone])), name
