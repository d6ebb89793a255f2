"""DeepSeek V2/V3 and Kimi K2: MLA + MoE quantized as docs/FORMAT.md's DeepSeek sections say, layer by layer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from slimquant.quant.pipeline import quantize
from tests.quant.common import FAST, read_output, read_source

FLOAT, W8A8, DYN = "FLOAT", "W8A8", "W8A8_DYNAMIC"
STATIC_SUFFIXES = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")
DYNAMIC_SUFFIXES = ("weight", "weight_scale", "weight_offset")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


def expected_description(config: dict, attn: str = W8A8, shifted: bool = True) -> dict[str, str]:
    """docs/FORMAT.md's DeepSeek mix written out by hand: MLA `attn`, every MLP linear dynamic, the rest FLOAT."""
    q = ("q_a_proj", "q_b_proj") if config.get("q_lora_rank") else ("q_proj",)
    desc = {"model.embed_tokens.weight": FLOAT}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for lin in (*q, "kv_a_proj_with_mqa", "o_proj"):
            desc |= linear(p + "self_attn." + lin, attn, bias=shifted and lin != "o_proj")
        desc |= {p + "self_attn.kv_a_layernorm.weight": FLOAT, p + "self_attn.kv_b_proj.weight": FLOAT}
        if "q_a_proj" in q:
            desc |= norm(p + "self_attn.q_a_layernorm", shifted)
        types = config.get("mlp_layer_types")  # GLM-4.7-Flash's; DeepSeek's first_k_dense_replace
        if types[i] == "dense" if types else i < config["first_k_dense_replace"]:
            for proj in MLP_PROJS:
                desc |= linear(f"{p}mlp.{proj}", DYN)
        else:
            for e in range(config["n_routed_experts"]):
                for proj in MLP_PROJS:
                    desc |= linear(f"{p}mlp.experts.{e}.{proj}", DYN)
            desc[p + "mlp.gate.weight"] = FLOAT
            if config["model_type"] != "deepseek_v2":
                desc[p + "mlp.gate.e_score_correction_bias"] = FLOAT
            for proj in MLP_PROJS:
                desc |= linear(f"{p}mlp.shared_experts.{proj}", DYN)
        desc |= norm(p + "input_layernorm", shifted) | {p + "post_attention_layernorm.weight": FLOAT}
    return desc | {"model.norm.weight": FLOAT, "lm_head.weight": FLOAT}


def linear(name: str, qtype: str, bias: bool = False) -> dict[str, str]:
    suffixes = STATIC_SUFFIXES if qtype == W8A8 else DYNAMIC_SUFFIXES
    out = {f"{name}.{s}": qtype for s in suffixes}
    return out | ({f"{name}.bias": FLOAT} if bias and qtype == W8A8 else {})


def norm(name: str, shifted: bool) -> dict[str, str]:
    return {f"{name}.weight": FLOAT} | ({f"{name}.bias": FLOAT} if shifted else {})


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def copy_with(src, dst, tensors: dict) -> None:
    """A copy of the HF folder src with its weights replaced by `tensors` (one shard)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(tensors, str(dst / "model.safetensors"))


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "glm4_moe_lite"])
def test_mixed_recipe_description(quantized, arch):
    src, dst, summary = quantized(arch)
    desc, tensors = read_output(dst)
    assert desc.pop("version") == "1.0.0" and desc.pop("model_quant_type") == DYN
    want = expected_description(config_of(src))
    assert desc == want and tensors.keys() == want.keys()
    experts = [k for k in desc if ".mlp.experts." in k and k.endswith(".weight")]
    assert experts == [f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(8) for p in MLP_PROJS]
    assert summary.anti_outlier == "iterative" and summary.model_quant_type == DYN
    assert tensors["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    a, b = "model.layers.0.self_attn.q_a_proj.", "model.layers.0.self_attn.kv_a_proj_with_mqa."
    for s in ("input_scale", "input_offset"):  # one fused_qkv_a_proj input quantization
        assert torch.equal(tensors[a + s], tensors[b + s])


def test_no_q_lora_uses_q_proj(tiny_model, tmp_path):
    src = tiny_model("deepseek_v2", q_lora_rank=None)
    quantize(src, tmp_path / "out", "w8a8", **FAST)
    desc, tensors = read_output(tmp_path / "out")
    desc.pop("version"), desc.pop("model_quant_type")
    assert desc == expected_description(config_of(src)) and "model.layers.0.self_attn.q_proj.deq_scale" in desc
    a, b = "model.layers.1.self_attn.q_proj.", "model.layers.1.self_attn.kv_a_proj_with_mqa."
    assert torch.equal(tensors[a + "input_scale"], tensors[b + "input_scale"])


def test_config_fields(quantized):
    _, dst, _ = quantized("deepseek_v3")
    text = (dst / "config.json").read_text()
    config = json.loads(text)
    assert config["quantize"] == "w8a8_dynamic" and config["mla_quantize"] == "w8a8"
    assert '\n    "' in text and "quantization_config" not in config


def test_all_dynamic(quantized):
    src, dst, summary = quantized("deepseek_v3", "w8a8_dynamic")
    desc, _ = read_output(dst)
    desc.pop("version"), desc.pop("model_quant_type")
    assert desc == expected_description(config_of(src), attn=DYN, shifted=False)
    assert summary.anti_outlier == "none"
    config = config_of(dst)
    assert config["quantize"] == "w8a8_dynamic" and config["mla_quantize"] == "w8a8_dynamic"


def test_weights_within_half_a_step(quantized):
    src, dst, _ = quantized("deepseek_v3", anti_outlier="none")
    desc, tensors = read_output(dst)
    source = read_source(src)
    checked = 0
    for name, t in tensors.items():
        if t.dtype != torch.int8:
            continue
        stem = name[: -len(".weight")]
        w, scale = source[name].float(), tensors[stem + ".weight_scale"]  # [N, K], [N, 1]
        assert (w - t.float() * scale).abs().le(scale / 2 * (1 + 1e-5) + 1e-12).all(), name
        checked += 1
    assert checked == sum(k.endswith(".weight") and v != FLOAT for k, v in desc.items()) > 30


def test_expert_without_tokens_is_quantized_and_counted(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3")
    tensors = read_source(src)
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"][3] = -100.0  # the router never picks expert 3
    copy_with(src, tmp_path / "src", tensors)
    summary = quantize(tmp_path / "src", tmp_path / "out", "w8a8", **FAST)
    assert summary.idle_experts == 1 and "experts with no tokens  1" in str(summary)
    desc, out = read_output(tmp_path / "out")
    for proj in MLP_PROJS:
        assert desc[f"model.layers.1.mlp.experts.3.{proj}.weight"] == DYN
        assert out[f"model.layers.1.mlp.experts.3.{proj}.weight"].dtype == torch.int8
    with pytest.raises(ValueError, match="share one quant type.*experts.0.gate_proj=W8A8_DYNAMIC"):
        quantize(tmp_path / "src", tmp_path / "out3", "w8a8", mix=["*.experts.3.*=w8a8"], **FAST)


@pytest.mark.parametrize("qtype", ["w8a8", "w8a16"])
def test_static_or_weight_only_routed_experts_are_refused_before_anything_is_written(tiny_model, tmp_path, qtype):
    """No current loader runs a static or W8A16 MoE layer (vLLM-Ascend's fused MoE has neither method)."""
    with pytest.raises(ValueError, match=f"routed expert linears would be {qtype.upper()} .*no current loader"):
        quantize(tiny_model("deepseek_v3"), tmp_path / "out", "w8a8", mix=[f"*.mlp.experts.*={qtype}"], **FAST)
    assert not (tmp_path / "out").exists()
