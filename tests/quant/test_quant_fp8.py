"""An FP8 block-quantized source quantizes exactly like its bf16 dequantization."""

from __future__ import annotations

import json
import math
import shutil

import torch
from safetensors.torch import save_file

from slimquant.quant.pipeline import quantize
from slimquant.quant.sources import dequantize_fp8_block
from tests.quant.common import FAST, read_output, read_source

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def to_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] -> (fp8 [M, N], scale_inv fp32 [ceil(M/128), ceil(N/128)]), as DeepSeek-V3 checkpoints store."""
    m, n = w.shape
    scale = torch.zeros(math.ceil(m / 128), math.ceil(n / 128))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float().abs().max() / 448.0
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:m, :n]  # [M, N]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def write_pair(src, fp8_dir, bf16_dir) -> None:
    """The same model as FP8 blocks (+quantization_config) and as their bf16 dequantization."""
    fp8, deq = {}, {}
    for name, t in read_source(src).items():
        if t.dim() == 2 and "_proj" in name:
            q, s = to_fp8_block(t)
            fp8 |= {name: q, name + "_scale_inv": s}
            deq[name] = dequantize_fp8_block(q, s)
        else:
            fp8[name] = deq[name] = t
    for folder, tensors in ((fp8_dir, fp8), (bf16_dir, deq)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    (fp8_dir / "config.json").write_text(json.dumps(config | {"quantization_config": FP8_CONFIG}))


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
