"""DeepSeek: clear errors for bad descriptions and configs; the engine generates as transformers does."""

from __future__ import annotations

import json

import pytest
import torch

from slimquant import LLM, SamplingParams
from slimquant.models.loader import load_model
from tests.engine.reference import hf_greedy
from tests.models.ascend_ckpt import write_ascend
from tests.models.test_model_deepseek_quantized import deepseek_mix


def _edit_description(folder, edit) -> None:
    path = folder / "quant_model_description.json"
    desc = json.loads(path.read_text())
    edit(desc)
    path.write_text(json.dumps(desc))


@pytest.mark.parametrize("key", ["mlp.experts.3.down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"])
def test_missing_description_entry_is_a_value_error(tiny_model, tmp_path, key):
    dst = write_ascend(tiny_model("deepseek_v3"), tmp_path / "q", deepseek_mix)
    _edit_description(dst, lambda d: d.pop(f"model.layers.1.{key}"))
    with pytest.raises(ValueError, match=f"no entry 'model.layers.1.{key}'"):
        load_model(str(dst))


def test_experts_with_different_quant_types_are_a_value_error(tiny_model, tmp_path):
    dst = write_ascend(tiny_model("deepseek_v3"), tmp_path / "q", deepseek_mix)
    _edit_description(dst, lambda d: d.update({"model.layers.1.mlp.experts.2.up_proj.weight": "W8A8"}))
    with pytest.raises(ValueError, match="Not all experts of model.layers.1.mlp.experts"):
        load_model(str(dst))


def test_static_experts_are_not_supported(tiny_model, tmp_path):
    def static_experts(prefix: str) -> str:
        return "W8A8" if ".mlp.experts." in prefix else deepseek_mix(prefix)

    dst = write_ascend(tiny_model("deepseek_v3"), tmp_path / "q", static_experts)
    with pytest.raises(ValueError, match="expert quant type 'W8A8' is not supported"):
        load_model(str(dst))


def test_unknown_routing_is_a_value_error(tiny_model):
    folder = tiny_model("deepseek_v2", topk_method="sinkhorn")
    with pytest.raises(ValueError, match="topk_method 'sinkhorn' is not supported"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"topk_group": 3}, "needs 1 <= topk_group <= n_group"),  # 2 groups
        ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 experts from topk_group 1"),  # 4 experts per group
        ({"scoring_func": "softmax"}, "'noaux_tc' routes by sigmoid scores"),
    ],
)
def test_routing_settings_that_cannot_route_are_a_value_error(tiny_model, overrides, message):
    """Settings the native router would index out of range with, or that transformers' V3 never runs."""
    with pytest.raises(ValueError, match=message):
        load_model(str(tiny_model("deepseek_v3", **overrides)))


def test_engine_greedy_matches_transformers(tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model("deepseek_v3")
    llm = LLM(str(path), max_model_len=64, num_kv_blocks=16, block_size=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for out in llm.generate(["Hello, my name is", "1 2 3"], params, use_tqdm=False):
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 6)


def test_registry_maps_deepseek_kimi_k2_and_glm_4_7_flash():
    from types import SimpleNamespace

    from slimquant.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Glm4MoeLiteForCausalLM
    from slimquant.models.registry import model_class

    glm = model_class(SimpleNamespace(architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite"))
    assert glm is Glm4MoeLiteForCausalLM and issubclass(glm, DeepseekV3ForCausalLM)

    assert model_class(SimpleNamespace(architectures=None, model_type="kimi_k2")) is DeepseekV3ForCausalLM
    assert (
        model_class(SimpleNamespace(architectures=["DeepseekV3ForCausalLM"], model_type=None)) is DeepseekV3ForCausalLM
    )
    assert model_class(SimpleNamespace(architectures=None, model_type="deepseek_v2")) is DeepseekV2ForCausalLM
