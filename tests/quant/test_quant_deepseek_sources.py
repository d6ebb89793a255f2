"""DeepSeek sources: FP8 blocks, MTP layers, Kimi K2's model_type, exact smoothing and per-expert layer building."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from slimquant.entrypoints.commands.inspect import render
from slimquant.format.architectures import ARCHS
from slimquant.models.compat import inspect_checkpoint
from slimquant.quant.activations import Activations
from slimquant.quant.calibration import load_texts, load_tokenizer, token_batches
from slimquant.quant.decoder import BiasedNorm, LayerRunner, replace_module
from slimquant.quant.observers import observe_inputs
from slimquant.quant.pipeline import quantize
from slimquant.quant.smooth import smooth_linear, smooth_norm, smoothing_factors
from slimquant.quant.sources import HFCheckpoint
from tests.quant.common import FAST, read_output, read_source
from tests.quant.test_quant_deepseek import copy_with
from tests.quant.test_quant_fp8 import write_pair


def test_fp8_source_matches_bf16_dequantization(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3", torch.bfloat16)
    fp8_dir, bf16_dir = tmp_path / "fp8", tmp_path / "bf16"
    write_pair(src, fp8_dir, bf16_dir)
    fp8 = read_source(fp8_dir)
    assert fp8["model.layers.1.mlp.experts.2.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert fp8["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"].shape == (1, 1)
    a, b = (quantize(d, tmp_path / f"q-{d.name}", "w8a8", **FAST).output for d in (fp8_dir, bf16_dir))
    (desc_a, ta), (desc_b, tb) = read_output(a), read_output(b)
    assert desc_a == desc_b and ta.keys() == tb.keys() and not any("scale_inv" in k for k in ta)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    config = json.loads((a / "config.json").read_text())
    assert "quantization_config" not in config and config["mla_quantize"] == "w8a8"


def mtp_tensors(source: dict, n: int) -> dict:
    """Layer n = a copy of layer n-1 plus DeepSeek-V3's MTP extras (enorm, hnorm, eh_proj, shared_head)."""
    prev, p = f"model.layers.{n - 1}.", f"model.layers.{n}."
    out = {p + k[len(prev) :]: t.clone() for k, t in source.items() if k.startswith(prev)}
    h = source["model.norm.weight"].shape[0]
    out |= {
        p + "enorm.weight": torch.rand(h),
        p + "hnorm.weight": torch.rand(h),
        p + "eh_proj.weight": torch.randn(h, 2 * h),
    }
    out |= {p + "shared_head.norm.weight": torch.rand(h), p + "shared_head.head.weight": source["lm_head.weight"] * 2}
    return out | {p + "embed_tokens.weight": source["model.embed_tokens.weight"].clone()}


@pytest.fixture(params=["deepseek_v3", "glm4_moe_lite"])
def mtp_source(tiny_model, tmp_path, request):
    """A tiny DeepSeek-V3 (or GLM-4.7-Flash, whose mlp_layer_types names the main layers only) with an MTP layer
    after its decoder layers: (folder, the MTP tensors, num_hidden_layers)."""
    src = tiny_model(request.param)
    source = read_source(src)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    copy_with(src, tmp_path / "src", source)
    extra = mtp_tensors(source, n)
    save_file(extra, str(tmp_path / "src" / "model-mtp.safetensors"))
    return tmp_path / "src", extra, n


def test_mtp_layer_written_float(mtp_source, tmp_path):
    src, extra, _ = mtp_source
    summary = quantize(src, tmp_path / "out", "w8a8", **FAST)
    assert summary.float_layers == 1 and re.search(r"MTP layers \(float\) +1\n", str(summary))
    desc, out = read_output(tmp_path / "out")
    for name, t in extra.items():
        assert desc[name] == "FLOAT" and torch.equal(out[name], t), name
    keys = list(desc)
    first_mtp = keys.index(min((k for k in extra), key=keys.index))
    assert keys.index("model.layers.1.post_attention_layernorm.weight") < first_mtp < keys.index("model.norm.weight")


def test_quant_mtp_writes_modelslims_mix(mtp_source, tmp_path, monkeypatch):
    """--quant-mtp: the MTP decoder layer as the others (static MLA under w8a8, dynamic experts, kv_b_proj and the
    router float) but not smoothed; eh_proj, enorm, hnorm, embed_tokens, shared_head float as they are; config.json
    says mtp_quantize. Its input is DeepSeek's eh_proj([enorm(embed(t[i + 1])); hnorm(h[i])]), checked here
    against a plain formula on the hidden states the last main layer gave."""
    from slimquant.quant import pipeline

    src, extra, n = mtp_source
    seen = {"input": []}
    real_input, real_layer = pipeline.mtp_input, pipeline.quantize_layer

    def record_input(*args):  # called per batch of samples
        seen["input"].append((args, real_input(*args)))
        return seen["input"][-1][1]

    def record_layer(i, state, runner, job, hidden, *args):
        seen[i] = hidden.tensor()  # the layer's input [S, T, H]
        out = real_layer(i, state, runner, job, hidden, *args)
        seen["out", i] = out.tensor()
        return out

    monkeypatch.setattr(pipeline, "mtp_input", record_input)
    monkeypatch.setattr(pipeline, "quantize_layer", record_layer)
    summary = quantize(src, tmp_path / "out", "w8a8", quant_mtp=True, **FAST)
    assert (
        summary.mtp_quantized == 1
        and summary.float_layers == 0
        and re.search(r"MTP layers \(quantized\) +1\n", str(summary))
    )
    desc, out = read_output(tmp_path / "out")
    p = f"model.layers.{n}."
    for rel in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert desc[f"{p}self_attn.{rel}.weight"] == "W8A8" and f"{p}self_attn.{rel}.deq_scale" in out
    assert desc[f"{p}self_attn.kv_b_proj.weight"] == "FLOAT" and desc[f"{p}mlp.gate.weight"] == "FLOAT"
    assert (
        desc[f"{p}mlp.experts.0.gate_proj.weight"] == desc[f"{p}mlp.shared_experts.down_proj.weight"] == "W8A8_DYNAMIC"
    )
    assert f"{p}input_layernorm.bias" not in desc and "model.layers.1.input_layernorm.bias" in desc  # not smoothed
    for rel in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.head.weight", "embed_tokens.weight"):
        assert desc[p + rel] == "FLOAT" and torch.equal(out[p + rel], extra[p + rel].to(out[p + rel].dtype)), rel
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mtp_quantize"] == "w8a8_dynamic"
    report = inspect_checkpoint(tmp_path / "out")  # `slimquant inspect` lists the MTP layer in a row of its own
    main_layers, mtp_row = report.layers[:-1], report.layers[-1]
    assert main_layers[-1].last == n - 1 and not any(g.mtp for g in main_layers)
    assert {f.rule for f in report.findings} == {"float32-model"}  # the tiny model's dtype, nothing of the MTP layer
    assert (mtp_row.first, mtp_row.last, mtp_row.mtp) == (n, n, True)
    assert mtp_row.schemes["W8A8"] == ["q_a", "q_b", "kv_a_with_mqa", "o"]
    assert f"layers {n} MTP " in render(report)
    (_, i, num_layers, _, _, eps), _ = seen["input"][0]
    ids, hidden, given = (torch.cat([call[0][k] if k < 5 else call[1] for call in seen["input"]]) for k in (3, 4, 5))
    assert i == n and num_layers == n and torch.equal(seen[n], given) and torch.equal(hidden, seen["out", n - 1])

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    tokens = extra[p + "embed_tokens.weight"].float()[ids[:, 1:]]  # [S, T - 1, H]: token i + 1 ...
    joined = torch.cat([rms(tokens, extra[p + "enorm.weight"]), rms(hidden[:, :-1], extra[p + "hnorm.weight"])], -1)
    torch.testing.assert_close(given, joined @ extra[p + "eh_proj.weight"].float().T)  # ... beside h[i]


def test_quant_mtp_without_an_mtp_layer_says_so(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="no layers past num_hidden_layers"):
        quantize(tiny_model("deepseek_v3"), tmp_path / "out", "w8a8", quant_mtp=True, **FAST)


def test_kimi_k2_quantizes_as_deepseek_v3(quantized, tiny_model, tmp_path):
    src, ref, _ = quantized("deepseek_v3")
    copy_with(src, tmp_path / "kimi", read_source(src))
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "kimi" / "config.json").write_text(json.dumps(config | {"model_type": "kimi_k2"}))
    quantize(tmp_path / "kimi", tmp_path / "out", "w8a8", **FAST)
    (desc_a, a), (desc_b, b) = read_output(tmp_path / "out"), read_output(ref)
    assert desc_a == desc_b and all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "kimi_k2"


def test_unsupported_architecture_lists_deepseek(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3")
    copy_with(src, tmp_path / "src", read_source(src))
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps(config | {"model_type": "deepseek_v4"}))
    with pytest.raises(
        ValueError, match="'deepseek_v4'.*deepseek_v2, deepseek_v3, glm4_moe, glm4_moe_lite, kimi_k2, llama, qwen"
    ):
        quantize(tmp_path / "src", tmp_path / "out", "w8a8", **FAST)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_smoothing_leaves_logits_unchanged(tiny_model, arch):
    src = tiny_model(arch)
    ids = token_batches(load_tokenizer(src), load_texts(), 2, 24)  # [S, T]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    spec, config = ARCHS[arch], json.loads((src / "config.json").read_text())
    pairs = {i: spec.layer_smooth_pairs(spec.layer_linears(config, i)) for i in range(config["num_hidden_layers"])}
    firsts = [f"model.layers.{i}.{group[0]}" for i, ps in pairs.items() for _, group in ps]
    with torch.no_grad(), observe_inputs(model, firsts) as ranges:
        ref = model(ids).logits
    with torch.no_grad():
        for i, ps in pairs.items():
            for src_norm, group in ps:
                p, lins = f"model.layers.{i}.", [model.get_submodule(f"model.layers.{i}.{r}") for r in group]
                sm = smoothing_factors(ranges[p + group[0]], [lin.weight for lin in lins], 0.5, shift=True)
                for lin in lins:
                    w, b = smooth_linear(lin.weight, lin.bias, sm)
                    lin.weight.copy_(w)
                    lin.bias = torch.nn.Parameter(b)
                norm = model.get_submodule(p + src_norm)
                w, b = smooth_norm(norm.weight, sm)
                norm.weight.copy_(w)
                replace_module(model, p + src_norm, BiasedNorm(norm, b))
        got = model(ids).logits
    assert len(firsts) == 2 * config["num_hidden_layers"]
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_layer_built_per_expert_matches_transformers(tiny_model):
    src = tiny_model("deepseek_v3")
    spec = ARCHS["deepseek_v3"]
    runner = LayerRunner(src, spec, torch.float32, "cpu")
    ckpt = HFCheckpoint(src)
    names = runner.param_names(1)
    assert "mlp.experts.7.down_proj.weight" in names and "mlp.gate.e_score_correction_bias" in names
    layer = runner.build(1, {r: ckpt.get(f"model.layers.1.{r}") for r in names})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    hidden = torch.randn(2, 12, model.config.hidden_size)  # [S, T, H]
    with torch.no_grad():
        want = model.model.layers[1](hidden, position_embeddings=runner._position_embeddings(12))
    got = runner.run(layer, Activations.of(hidden.split(1))).tensor()  # one sample a batch
    torch.testing.assert_close(got, want[0] if isinstance(want, tuple) else want, rtol=1e-5, atol=1e-5)


def test_missing_expert_tensor_is_named(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3")
    tensors = read_source(src)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    copy_with(src, tmp_path / "src", tensors)
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*'model.layers.1.mlp.experts.5.up_proj.weight'"):
        quantize(tmp_path / "src", tmp_path / "out", "w8a8", **FAST)
    assert not (tmp_path / "out").exists()
