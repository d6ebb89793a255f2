"""8-bit sources (FP8 blocks, per tensor, compressed-tensors FP8 / int8) quantize exactly like their bf16
dequantization; other quantized sources and 8-bit weights without scales are refused by name."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from slimquant.quant.pipeline import quantize
from slimquant.quant.sources import dequantize_weight
from tests.quant.common import FAST, read_output, read_source

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def test_fp8_block_source_matches_bf16_dequantization(tiny_model, tmp_path):
    src = tiny_model("llama", torch.bfloat16, hidden_size=160, intermediate_size=200, num_attention_heads=4)
    fp8_dir, bf16_dir = tmp_path / "fp8", tmp_path / "bf16"
    write_pair(src, fp8_dir, bf16_dir)
    assert read_source(fp8_dir)["model.layers.0.mlp.up_proj.weight"].shape == (200, 160)
    out_fp8 = quantize(fp8_dir, tmp_path / "q-fp8", "w8a8", **FAST)
    out_bf16 = quantize(bf16_dir, tmp_path / "q-bf16", "w8a8", **FAST)
    desc_a, a = read_output(out_fp8.output)
    desc_b, b = read_output(out_bf16.output)
    assert desc_a == desc_b and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not any(k.endswith("scale_inv") for k in a)
    config = json.loads((out_fp8.output / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"


def ct_config(fmt: str, weights: dict) -> dict:
    """An llm-compressor (compressed-tensors) quantization_config with one config group."""
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "symmetric": True, "dynamic": False} | weights}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group}}


FP8_MAX, INT8_MAX = 448.0, 127.0
# name -> (quantization_config, stored dtype, scale layout: "tensor", "row" or (rows, columns) per block)
SOURCES = {
    "fp8 blocks of 128 (DeepSeek)": (FP8_CONFIG, torch.float8_e4m3fn, (128, 128)),
    "fp8 per tensor (vLLM)": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, torch.float8_e4m3fn, "tensor"),
    "fp8 blocks of 64 x 32": (FP8_CONFIG | {"weight_block_size": [64, 32]}, torch.float8_e4m3fn, (64, 32)),
    "compressed-tensors fp8 per channel": (
        ct_config("float-quantized", {"type": "float", "strategy": "channel"}),
        torch.float8_e4m3fn,
        "row",
    ),
    "compressed-tensors fp8 blocks": (
        ct_config("float-quantized", {"type": "float", "strategy": "block", "block_structure": [32, 64]}),
        torch.float8_e4m3fn,
        (32, 64),
    ),
    "compressed-tensors int8 per channel": (
        ct_config("int-quantized", {"type": "int", "strategy": "channel"}),
        torch.int8,
        "row",
    ),
    "compressed-tensors int8 per group of 32": (
        ct_config("int-quantized", {"type": "int", "strategy": "group", "group_size": 32}),
        torch.int8,
        (1, 32),
    ),
}


def to_8bit(w: torch.Tensor, dtype: torch.dtype, layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [M, N] -> (8-bit weight, its scale as the layout stores it, the bf16 the two stand for), written out per
    layout: one scale, one per row [M, 1], or one per block [ceil(M/bm), ceil(N/bn)]."""
    m, n = w.shape
    top = FP8_MAX if dtype.is_floating_point else INT8_MAX
    if layout == "tensor":
        scale = w.float().abs().max() / top
        full = scale.expand(m, n)
    elif layout == "row":
        scale = w.float().abs().amax(dim=1, keepdim=True) / top  # [M, 1]
        full = scale.expand(m, n)
    else:
        (bm, bn), full = layout, torch.empty(m, n)
        scale = torch.zeros(math.ceil(m / bm), math.ceil(n / bn))
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                scale[i, j] = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float().abs().max() / top
                full[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = scale[i, j]
    q = w.float() / full
    q = q.round().clamp(-128, 127).to(torch.int8) if dtype == torch.int8 else q.to(dtype)
    return q, scale, (q.float() * full).to(torch.bfloat16)


def write_pair(src, q_dir, bf16_dir, name: str = "fp8 blocks of 128 (DeepSeek)") -> None:
    """The same model with its linears' weights as SOURCES[name] stores them (8-bit, their scales, a static
    input_scale beside them, the quantization_config) and as the bf16 those stand for."""
    qc, dtype, layout = SOURCES[name]
    suffix = "_scale_inv" if qc["quant_method"] == "fp8" and "weight_block_size" in qc else "_scale"
    stored, deq = {}, {}
    for key, t in read_source(src).items():
        if t.dim() == 2 and "_proj" in key:
            q, scale, deq[key] = to_8bit(t, dtype, layout)
            stored |= {key: q, key + suffix: scale, key.replace(".weight", ".input_scale"): torch.ones(1)}
        else:
            stored[key] = deq[key] = t
    for folder, tensors in ((q_dir, stored), (bf16_dir, deq)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((q_dir / "config.json").read_text())
    (q_dir / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))


@pytest.mark.parametrize("name", SOURCES)
def test_8bit_sources_quantize_as_their_bf16_dequantization(tiny_model, tmp_path, name):
    """FP8 per tensor or in blocks of another size, compressed-tensors FP8 / int8 per channel or block
    (llm-compressor's FP8_DYNAMIC / W8A8): the quantizer reads each as the bf16 its weights and scales stand for;
    companions it does not need (a static input_scale) are not carried over."""
    src = tiny_model("llama", torch.bfloat16, hidden_size=160, intermediate_size=200, num_attention_heads=4)
    q_dir, bf16_dir = tmp_path / "8bit", tmp_path / "bf16"
    write_pair(src, q_dir, bf16_dir, name)
    a = read_output(quantize(q_dir, tmp_path / "q-a", "w8a8_dynamic", **FAST).output)
    b = read_output(quantize(bf16_dir, tmp_path / "q-b", "w8a8_dynamic", **FAST).output)
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert not any(k.endswith(("_scale_inv", "input_scale")) for k in a[1])


@pytest.mark.parametrize(
    "qc, message",
    [
        ({"quant_method": "gptq", "bits": 4}, "a 'gptq'-quantized checkpoint"),
        ({"quant_method": "mxfp4"}, "a 'mxfp4'-quantized checkpoint"),
        (ct_config("int-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}), "4 bits"),
    ],
)
def test_other_quantized_sources_are_refused_by_name(tiny_model, tmp_path, qc, message):
    folder = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    with pytest.raises(ValueError, match=re.escape(message)):
        quantize(folder, tmp_path / "q", "w8a8_dynamic", **FAST)


def test_8bit_weights_without_scales_are_a_clear_error(tiny_model, tmp_path):
    """An already quantized folder (int8 weights, no quantization_config naming scales) given as the source."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = read_source(tiny_model("llama"))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].clamp(-1, 1).mul(100).to(torch.int8)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{re.escape(key)} is stored as torch.int8 with no scale"):
        quantize(folder, tmp_path / "q", "w8a8_dynamic", **FAST)


def test_scales_of_the_wrong_shape_are_a_clear_error():
    w = torch.zeros(100, 70, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=re.escape("a weight [100, 70] in blocks of 64 x 32 has scales of shape")):
        dequantize_weight(w, torch.ones(2, 2), (64, 32))
    with pytest.raises(ValueError, match="neither one per row nor one in all"):
        dequantize_weight(w, torch.ones(70), None)
