"""The written checkpoint matches docs/FORMAT.md: names, order, dtypes, shapes, types, index, shards, weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimquant.format.primitives import decode_deq_scale
from tests.quant.common import FAST, read_output, read_source

ARCHS = ("llama", "qwen2", "qwen3")
STATIC = ("weight", "bias", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")
DYNAMIC = ("weight", "bias", "weight_scale", "weight_offset")


def expected_entries(src, plan_of) -> list[tuple[str, str]]:
    """(name, type) in named_modules() order, from transformers' own model of the source config."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    out = []
    for name, mod in model.named_modules():
        qtype = plan_of(name) if isinstance(mod, torch.nn.Linear) and name != "lm_head" else "FLOAT"
        if qtype == "FLOAT":
            out += [(f"{name}.{p}", "FLOAT") for p, _ in mod.named_parameters(recurse=False)]
            continue
        for suffix in STATIC if qtype == "W8A8" else DYNAMIC:
            if suffix != "bias" or mod.bias is not None:
                out.append((f"{name}.{suffix}", "FLOAT" if suffix == "bias" else qtype))
    return out


def check_linear(t: dict, name: str, qtype: str, n: int, k: int, dtype: torch.dtype) -> None:
    assert t[f"{name}.weight"].dtype == torch.int8 and t[f"{name}.weight"].shape == (n, k)
    for s in ("weight_scale", "weight_offset"):
        assert t[f"{name}.{s}"].dtype == torch.float32 and t[f"{name}.{s}"].shape == (n, 1)
    assert not t[f"{name}.weight_offset"].any()
    if f"{name}.bias" in t:
        assert t[f"{name}.bias"].dtype == dtype and t[f"{name}.bias"].shape == (n,)
    if qtype == "W8A8":
        for s in ("input_scale", "input_offset"):
            assert t[f"{name}.{s}"].dtype == torch.float32 and t[f"{name}.{s}"].shape == (1,)
        assert t[f"{name}.input_offset"].item() == round(t[f"{name}.input_offset"].item())
        assert t[f"{name}.quant_bias"].dtype == torch.int32 and t[f"{name}.quant_bias"].shape == (n,)
        deq = t[f"{name}.deq_scale"]
        assert deq.dtype == (torch.float32 if dtype == torch.bfloat16 else torch.int64) and deq.shape == (n,)
        want = t[f"{name}.input_scale"] * t[f"{name}.weight_scale"].reshape(-1)
        torch.testing.assert_close(decode_deq_scale(deq), want)


def check_output(src, dst, plan_of, dtype) -> None:
    desc, tensors = read_output(dst)
    assert list(desc)[:2] == ["version", "model_quant_type"] and desc["version"] == "1.0.0"
    assert list(desc.items())[2:] == expected_entries(src, plan_of)
    assert set(tensors) == set(desc) - {"version", "model_quant_type"}
    source = read_source(src)
    for name, qtype in desc.items():
        if qtype == "FLOAT" and name in source:
            assert tensors[name].dtype == dtype and tensors[name].shape == source[name].shape
        elif name.endswith(".weight") and qtype != "FLOAT":
            n, k = source[name].shape
            check_linear(tensors, name[: -len(".weight")], qtype, n, k, dtype)


def default_plan(name: str) -> str:
    """--type w8a8's default recipe on Llama/Qwen: mlp.down_proj dynamic, every other linear static."""
    return "W8A8_DYNAMIC" if name.endswith("mlp.down_proj") else "W8A8"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant_type", ["w8a8", "w8a8_dynamic", "w8a8-static-all"])
def test_round_trip(quantized, arch, quant_type):
    if quant_type == "w8a8":
        src, dst, summary = quantized(arch, quant_type)
        check_output(src, dst, default_plan, torch.float32)
        assert summary.linears == {"W8A8": 12, "W8A8_DYNAMIC": 2, "FLOAT": 1}
    else:
        qtype = quant_type.removesuffix("-static-all")
        src, dst, summary = quantized(arch, qtype, **({"static_all": True} if qtype != quant_type else {}))
        check_output(src, dst, lambda name: qtype.upper(), torch.float32)
        assert summary.linears == {qtype.upper(): 14, "FLOAT": 1}
    assert summary.output_bytes > 0 and summary.source_bytes > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_mix_and_keep_float(quantized, arch):
    src, dst, summary = quantized(arch, "w8a8", mix=["*.mlp.*=w8a8_dynamic"], keep_float=["*.1.self_attn.*"])

    def plan_of(name: str) -> str:
        if ".1.self_attn." in name:
            return "FLOAT"
        return "W8A8_DYNAMIC" if ".mlp." in name else "W8A8"

    check_output(src, dst, plan_of, torch.float32)
    assert summary.linears == {"W8A8": 4, "W8A8_DYNAMIC": 6, "FLOAT": 5}


def test_weight_only_down_proj_is_not_smoothed(quantized):
    """--mix '*.mlp.down_proj=w8a16': its input stays float, so up_proj -> down_proj is not smoothed (it would only
    coarsen the weight): down_proj is the source's own and up_proj only column-smoothed by its norm (which still
    is), within half a step."""
    src, dst, summary = quantized("llama", "w8a8_dynamic", mix=["*.mlp.down_proj=w8a16"])
    check_output(src, dst, lambda name: "W8A16" if name.endswith("down_proj") else "W8A8_DYNAMIC", torch.float32)
    assert summary.linears == {"W8A8_DYNAMIC": 12, "W8A16": 2, "FLOAT": 1}
    _, t = read_output(dst)
    source = read_source(src)
    for i in range(2):
        p = f"model.layers.{i}."
        s_mlp = source[p + "post_attention_layernorm.weight"] / t[p + "post_attention_layernorm.weight"]  # [K]
        assert not torch.allclose(s_mlp, torch.ones_like(s_mlp))
        for rel, s in (("mlp.up_proj", s_mlp), ("mlp.down_proj", None)):
            w = source[p + rel + ".weight"] * (1 if s is None else s[None, :])  # [N, K]
            scale = t[p + rel + ".weight_scale"]  # [N, 1]
            err = (t[p + rel + ".weight"].float() * scale - w).abs()
            assert (err <= scale * 0.5 * (1 + 1e-4) + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_dtype_sets_deq_scale_and_float_dtypes(quantized, dtype):
    src, dst, _ = quantized("qwen2", "w8a8", dtype=dtype)
    check_output(src, dst, default_plan, dtype)


def test_shards_and_index(quantized):
    src, dst, _ = quantized("llama", "w8a8_dynamic", shard_size="40KB")
    desc, tensors = read_output(dst)
    index = json.loads((dst / "quant_model_weight_w8a8_dynamic.safetensors.index.json").read_text())
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [
        f"quant_model_weight_w8a8_dynamic-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not list(dst.glob(".*")), "no temporary files left"
    files = {p.name for p in dst.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "chat_template.jinja" in files and not any(f.startswith("model.safetensors") for f in files)


@pytest.mark.parametrize("anti_outlier", ["none", "smoothquant"])
def test_dequantized_weights_within_half_step(quantized, anti_outlier):
    src, dst, _ = quantized("qwen3", "w8a8", anti_outlier=anti_outlier, rotate=False)  # the source's own weights
    _, t = read_output(dst)
    source = read_source(src)
    for i in range(2):
        p = f"model.layers.{i}."
        s_attn = source[p + "input_layernorm.weight"] / t[p + "input_layernorm.weight"]  # [K] smoothing scale
        s_mlp = source[p + "post_attention_layernorm.weight"] / t[p + "post_attention_layernorm.weight"]
        for rel, s in [("self_attn.q_proj", s_attn), ("self_attn.v_proj", s_attn), ("mlp.gate_proj", s_mlp)]:
            w = source[f"{p}{rel}.weight"] * s[None, :]  # smoothed source [N, K]
            scale = t[f"{p}{rel}.weight_scale"]  # [N, 1]
            err = (t[f"{p}{rel}.weight"].float() * scale - w).abs()
            assert (err <= scale * 0.5 * (1 + 1e-4) + 1e-7).all()
        if anti_outlier == "none":
            assert torch.equal(s_attn, torch.ones_like(s_attn))
        else:
            assert not torch.allclose(s_attn, torch.ones_like(s_attn))


def test_tied_embeddings_get_an_lm_head_entry(tiny_model, tmp_path):
    """vLLM-Ascend looks lm_head.weight up in the description (a KeyError without it): written FLOAT, a copy of the
    embeddings, as ModelSlim V1 writes it; slimquant still runs the model tied."""
    from slimquant import LLM, SamplingParams
    from slimquant.quant.pipeline import quantize

    src = tiny_model("llama", tie_word_embeddings=True)
    dst = tmp_path / "q"
    summary = quantize(src, dst, "w8a8_dynamic", **FAST)
    desc, tensors = read_output(dst)
    assert "lm_head.weight" not in read_source(src)  # the source ties: no head of its own
    assert list(desc)[-1] == "lm_head.weight" and desc["lm_head.weight"] == "FLOAT"
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert summary.linears["FLOAT"] == 1
    out = LLM(str(dst), max_model_len=32).generate(["hi"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_float32_sources_are_told_that_vllm_ascend_will_not_load_them(quantized):
    _, _, fp32 = quantized("llama", "w8a8_dynamic")
    _, _, bf16 = quantized("llama", "w8a8_dynamic", dtype=torch.bfloat16)
    assert any("vLLM-Ascend does not" in n for n in fp32.notes) and "note" in str(fp32)
    assert bf16.notes == []
