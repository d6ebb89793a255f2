"""Quantized DeepSeek: the default mix (MLA static W8A8, MLP / shared / routed experts W8A8_DYNAMIC, kv_b_proj and
router float) equals transformers' DeepSeek with plain docs/FORMAT.md int8 math in its linears and experts."""

from __future__ import annotations

import pytest
import torch

from slimquant.format.checkpoint import read_description, tensor_types
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.layers.moe import RoutedExperts
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close
from tests.models.reference import experts_ref, reference_logits, reference_model

ARCHS = {"deepseek_v3": {}, "deepseek_v2": {"norm_topk_prob": False}, "glm4_moe_lite": {}}


def deepseek_mix(prefix: str) -> str:
    """ModelSlim's DeepSeek recipe: {"*.mlp.*": "w8a8_dynamic", "*": "w8a8"}, kv_b_proj kept float."""
    if prefix.endswith("kv_b_proj"):
        return "FLOAT"
    return "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8"


def experts_float(prefix: str) -> str:
    """Routed experts float, the rest as the DeepSeek mix."""
    return "FLOAT" if ".mlp.experts." in prefix else deepseek_mix(prefix)


def run_both(src, dst) -> tuple[torch.Tensor, torch.Tensor]:
    """(our logits, reference logits) for PROMPT: a prefill chunk, then decode steps."""
    loaded = load_model(str(dst))
    assert loaded.quantized
    runner = PagedRunner.of(loaded, torch.float32)
    ours = torch.cat([runner.step({0: PROMPT[:7]}), *[runner.step({0: [t]}) for t in PROMPT[7:]]])
    return ours, reference_logits(reference_model(src, dst, torch.float32), PROMPT)


def kv_b_quantized(prefix: str) -> str:
    """kv_b_proj static and o_proj dynamic: the latent up-projection through the int8 quant methods too."""
    if prefix.endswith("kv_b_proj"):
        return "W8A8"
    return "W8A8_DYNAMIC" if ".mlp." in prefix or prefix.endswith("o_proj") else "W8A8"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", [deepseek_mix, kv_b_quantized])
def test_deepseek_mix_matches_reference(tiny_model, tmp_path, arch, scheme):
    src = tiny_model(arch, **ARCHS[arch])
    ours, ref = run_both(src, write_ascend(src, tmp_path / "q", scheme))
    assert_close(ours, ref, rel=1e-4)


def test_v2_lite_without_q_lora(tiny_model, tmp_path):
    """q_lora_rank None: a plain q_proj (static W8A8) instead of q_a_proj / q_b_proj."""
    src = tiny_model("deepseek_v2", q_lora_rank=None, topk_method="greedy", norm_topk_prob=False)
    ours, ref = run_both(src, write_ascend(src, tmp_path / "q", deepseek_mix))
    assert_close(ours, ref, rel=1e-4)


def test_float_experts_and_shift_biases(tiny_model, tmp_path):
    """Experts kept float (their weight entries FLOAT), anti-outlier norm / linear biases on the MLA path."""
    src = tiny_model("deepseek_v3")
    dst = write_ascend(src, tmp_path / "q", experts_float, shift=True)
    loaded = load_model(str(dst))
    experts = [m for m in loaded.model.modules() if isinstance(m, RoutedExperts)]
    assert experts and not any(m.quantized for m in experts)
    ours, ref = run_both(src, dst)
    assert_close(ours, ref, rel=1e-4)


def test_quantized_experts_are_int8(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3")
    loaded = load_model(str(write_ascend(src, tmp_path / "q", deepseek_mix)))
    experts = next(m for m in loaded.model.modules() if isinstance(m, RoutedExperts))
    assert experts.quant_type == "W8A8_DYNAMIC" and experts.w13_scale.shape == (8, 64)
    attn = loaded.model.model.layers[1].self_attn
    assert type(attn.fused_qkv_a_proj.method).__name__ == "W8A8StaticMethod"
    assert type(attn.kv_b_proj.method).__name__ == "UnquantizedMethod"


def test_int8_experts_match_reference_directly(tiny_model, tmp_path):
    """The routed experts alone on large random inputs: int8 GEMMs, re-quantized activations, top-k sum."""
    src = tiny_model("deepseek_v3")
    dst = write_ascend(src, tmp_path / "q", deepseek_mix)
    experts = load_model(str(dst)).model.model.layers[1].mlp.experts
    name = "model.layers.1.mlp.experts"
    ref = experts_ref(name, SafetensorsFolder(dst), tensor_types(read_description(dst)), torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(20, 64, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(20)])  # [T, 2] distinct experts
    weights = torch.rand(20, 2, generator=gen)
    ours, expected = experts(x, weights, ids), ref(x, ids, weights)
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert all(e["down_proj"].t["weight"].dtype == torch.int8 for e in ref.experts)


def test_experts_add_in_ascending_expert_order(tiny_model, tmp_path):
    """One process adds each token's weighted expert outputs straight into [T, H] in ascending expert id, which
    must be bit for bit the sum that expert parallel's add_in_expert_order makes of its [T, K, H] slots (four experts
    per token: with two, either order gives the same sum)."""
    from slimquant.backends.torch_ops import add_in_expert_order

    src = tiny_model("deepseek_v3")
    experts = load_model(str(write_ascend(src, tmp_path / "q", deepseek_mix))).model.model.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(40, 64, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:4] for _ in range(40)])  # [T, 4] distinct experts
    weights = torch.rand(40, 4, generator=gen)
    routes = experts._routes(ids)
    slots = torch.zeros(40, 4, 64)  # [T, K, H]
    for (_, tokens, slot), y in zip(routes, experts._weighted_outputs(x, weights, routes), strict=True):
        slots[tokens, slot] = y
    ours = experts(x, weights, ids)
    assert torch.equal(ours, add_in_expert_order(slots, ids))
    assert not torch.equal(ours, add_in_expert_order(slots, -ids))  # descending: another sum


@pytest.mark.parametrize("quant_type", ["w8a8", "w8a8_dynamic"])
def test_project_quantizer_checkpoint_matches_reference(tiny_model, tmp_path, quant_type):
    """End to end: `slimquant quantize` of a bf16 DeepSeek V3, prefill then decode in bf16, as close to the
    reference math in fp32 as transformers' own bf16 run of the same int8 checkpoint is. bf16 rounds our op order
    (fused attention, absorbed decode) differently from the reference's, and int8 re-quantization magnifies that:
    their exact agreement is checked in fp32 (test_deepseek_mix_matches_reference)."""
    from slimquant.quant.pipeline import quantize

    src, dst = tiny_model("deepseek_v3", dtype=torch.bfloat16), tmp_path / "q"
    method = "iterative" if quant_type == "w8a8" else "smoothquant"  # no shift into bias-free dynamic linears
    quantize(src, dst, quant_type, anti_outlier=method, num_samples=2, seq_len=16, progress=False)
    assert_bf16_as_close_as_transformers(src, dst)


def assert_bf16_as_close_as_transformers(src, dst) -> None:
    """dst (int8 experts) in bf16, a prefill chunk then decode steps, is as close to the reference math in fp32 as
    transformers' own bf16 run of the same checkpoint is (within 1.5x), and within 5% of the logits' scale."""
    loaded = load_model(str(dst), dtype=torch.bfloat16)
    assert any(m.quantized for m in loaded.model.modules() if isinstance(m, RoutedExperts))
    runner = PagedRunner.of(loaded)
    ours = torch.cat([runner.step({0: PROMPT[:7]}), *[runner.step({0: [t]}) for t in PROMPT[7:]]])
    truth = reference_logits(reference_model(src, dst, torch.float32), PROMPT)
    theirs = reference_logits(reference_model(src, dst, torch.bfloat16), PROMPT)
    ours_err, theirs_err = ((x.float() - truth).abs().max().item() for x in (ours, theirs))
    assert ours_err <= 1.5 * theirs_err and ours_err < 0.05 * truth.abs().max().item(), (ours_err, theirs_err)
