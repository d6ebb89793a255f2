"""Calibration data loading, and static input scales that cover the observed activation ranges."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimquant.quant.calibration import BUILTIN, load_texts, load_tokenizer, token_batches
from slimquant.quant.observers import observe_inputs
from slimquant.quant.smooth import smoothing_factors
from tests.quant.common import read_output

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_builtin_prompts():
    texts = load_texts()
    assert len(texts) >= 40 and len(set(texts)) == len(texts) and all(len(t) > 20 for t in texts)
    assert json.loads(BUILTIN.read_text()) == texts


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond one\n")
    (tmp_path / "b.json").write_text(json.dumps(["x y", "z"]))
    (tmp_path / "c.jsonl").write_text('{"text": "hello"}\n\n{"text": "world", "id": 2}\n')
    assert load_texts(tmp_path / "a.txt") == ["first paragraph", "second one\n"]
    assert load_texts(tmp_path / "b.json") == ["x y", "z"]
    assert load_texts(tmp_path / "c.jsonl") == ["hello", "world"]


def test_token_batches_cycle_short_data(tiny_model):
    ids = token_batches(load_tokenizer(tiny_model("llama")), ["hello world"], num_samples=3, seq_len=40)
    assert ids.shape == (3, 40) and ids.dtype == torch.long


def layer0_inputs(src, dst, ids) -> dict[str, tuple[float, float]]:
    """(min, max) of each layer-0 linear input of the float model, mapped through the written smoothing."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    _, t = read_output(dst)
    p = "model.layers.0."
    layer = model.model.layers[0]
    with torch.no_grad():
        s_attn = layer.input_layernorm.weight / t[p + "input_layernorm.weight"]  # [K] smoothing scales
        s_mlp = layer.post_attention_layernorm.weight / t[p + "post_attention_layernorm.weight"]
    smoothing = {"q_proj": s_attn, "k_proj": s_attn, "v_proj": s_attn, "gate_proj": s_mlp, "up_proj": s_mlp}
    names = [n for n, _ in layer.named_modules() if n.split(".")[-1] in LINEARS]
    with torch.no_grad(), observe_inputs(layer, names) as ranges:
        model(ids)
    # up_proj -> down_proj smoothing lives in up_proj's rows: recompute it from the same statistics
    with torch.no_grad():
        w_down = layer.mlp.down_proj.weight
        smoothing["down_proj"] = smoothing_factors(ranges["mlp.down_proj"], [w_down], 0.5, shift=False).scale
    out = {}
    for n, r in ranges.items():
        s = smoothing.get(n.split(".")[-1])
        out[n] = (r.transformed(0.0, s) if s is not None else r).tensor_range()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_scales_cover_calibration_ranges(quantized, arch):
    # static_all: down_proj static too (the default w8a8 recipe makes it dynamic)
    src, dst, _ = quantized(arch, "w8a8", anti_outlier="smoothquant", alpha=0.5, static_all=True, rotate=False)
    _, t = read_output(dst)
    ids = token_batches(load_tokenizer(src), load_texts(), 2, 16)  # the FAST calibration set
    for name, (lo, hi) in layer0_inputs(src, dst, ids).items():
        scale, offset = t[f"model.layers.0.{name}.input_scale"], t[f"model.layers.0.{name}.input_offset"]
        q = torch.tensor([lo, hi]) / scale + offset  # before rounding and clamping
        assert q[0] >= -128.5 - 1e-3 and q[1] <= 127.5 + 1e-3, name
        assert (hi - lo) / 255 <= scale.item() * (1 + 1e-3), "scale no wider than the range needs"
    for i in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            part = "self_attn" if group[0] == "q_proj" else "mlp"
            params = [
                (t[f"model.layers.{i}.{part}.{g}.input_scale"], t[f"model.layers.{i}.{part}.{g}.input_offset"])
                for g in group
            ]
            assert all(torch.equal(a, params[0][0]) and torch.equal(b, params[0][1]) for a, b in params), "fused share"
