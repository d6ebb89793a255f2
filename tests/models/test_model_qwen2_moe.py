"""Qwen2-MoE (qwen2_moe): routed experts behind a softmax top-k router plus one shared expert scaled per token by
sigmoid(shared_expert_gate x), q/k/v biases. Float equals transformers (also tests/models/test_model_float.py); int8
checkpoints equal transformers' model with plain docs/FORMAT.md math (tests/models/test_model_qwen3_moe.py); the
project's quantizer writes the MoE recipe and keeps the shared expert's gate float, as vLLM builds it."""

from __future__ import annotations

import json

import pytest
import torch

from slimquant.format.checkpoint import read_description, tensor_types
from slimquant.layers.moe import SparseMoE
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits
from tests.models.test_model_deepseek_quantized import assert_bf16_as_close_as_transformers
from tests.models.test_model_qwen3_moe import moe_mix

VARIANTS = {
    "renormalized, no q/k/v biases": {"norm_topk_prob": True, "qkv_bias": False},
    "every second layer routed": {"num_hidden_layers": 4, "mlp_only_layers": [], "decoder_sparse_step": 2},
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_chunked_prefill_then_decode_matches_transformers(tiny_model, overrides):
    from transformers import AutoModelForCausalLM

    folder = tiny_model("qwen2_moe", **overrides)
    theirs = [type(layer.mlp).__name__ for layer in AutoModelForCausalLM.from_pretrained(folder).model.layers]
    loaded = load_model(str(folder))
    layers = loaded.model.model.layers
    assert [isinstance(layer.mlp, SparseMoE) for layer in layers] == [n.endswith("MoeBlock") for n in theirs]
    moe = next(layer.mlp for layer in layers if isinstance(layer.mlp, SparseMoE))
    assert moe.shared is moe.shared_expert and moe.shared_experts is None and moe.shared_expert_gate is not None
    assert (layers[0].self_attn.qkv_proj.bias is not None) == overrides.get("qkv_bias", True)
    runner = PagedRunner.of(loaded, torch.float32)
    first = runner.step({0: PROMPT[:6]})
    rest = [runner.step({0: [t]}) for t in PROMPT[6:]]
    assert_close(torch.cat([first, *rest]), hf_logits(folder, PROMPT))


def test_project_quantizer_checkpoint_matches_reference(tiny_model, tmp_path):
    """`slimquant quantize --type w8a8` of a bf16 Qwen2-MoE: attention static, every MLP linear (dense, the shared
    expert and the routed experts) dynamic, the router and the shared expert's gate float; bf16 decode as close to the
    reference math as transformers' own bf16 run."""
    from slimquant.quant.pipeline import quantize

    src, dst = tiny_model("qwen2_moe", dtype=torch.bfloat16), tmp_path / "q"
    quantize(src, dst, "w8a8", num_samples=2, seq_len=16, progress=False)
    types = tensor_types(read_description(dst))
    assert json.loads((dst / "config.json").read_text())["quantize"] == "w8a8_dynamic"
    assert types["model.layers.1.mlp.gate.weight"] == types["model.layers.1.mlp.shared_expert_gate.weight"] == "FLOAT"
    weights = {n.removesuffix(".weight"): t for n, t in types.items() if n.endswith(".weight") and ".layers." in n}
    linears = {n: t for n, t in weights.items() if not n.endswith(("norm", "mlp.gate", "shared_expert_gate"))}
    assert {n.split(".")[-1] for n in linears if ".shared_expert." in n} == {"gate_proj", "up_proj", "down_proj"}
    assert {n: t for n, t in linears.items() if t != moe_mix(n)} == {}
    assert_bf16_as_close_as_transformers(src, dst)


def test_a_quantized_shared_expert_gate_is_refused(tiny_model, tmp_path):
    """vLLM builds shared_expert_gate float (quant_config=None): a checkpoint that says otherwise is refused by name
    before any weight is read."""
    dst = write_ascend(tiny_model("qwen2_moe"), tmp_path / "q", moe_mix)
    path = dst / "quant_model_description.json"
    description = json.loads(path.read_text())
    description["model.layers.1.mlp.shared_expert_gate.weight"] = "W8A8_DYNAMIC"
    path.write_text(json.dumps(description))
    with pytest.raises(
        ValueError, match=r"quantizes \{'model\.layers\.1\.mlp\.shared_expert_gate\.weight': 'W8A8_DYNAMIC'\}"
    ):
        load_model(str(dst))


def test_int8_steps_run_in_one_native_call(tiny_model, tmp_path):
    """The whole-step native call takes Qwen2-MoE's layers (the gated shared expert inside it;
    tests/models/test_native_decoder_layer.py checks its bits against the per-op path's)."""
    loaded = load_model(str(write_ascend(tiny_model("qwen2_moe"), tmp_path / "q", moe_mix)))
    if type(loaded.backend).__name__ != "CpuNativeBackend":
        pytest.skip("native kernels unavailable")
    assert loaded.backend.stack is not None, loaded.backend.describe()
    assert "in one native call" in loaded.backend.describe()
