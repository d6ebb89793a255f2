"""A .gguf source is converted to a temporary HF folder (slimquant.quant.gguf) and quantized from there."""

from __future__ import annotations

import shutil

import pytest

import slimquant.quant.gguf as gguf
from slimquant.quant.pipeline import quantize
from tests.quant.common import FAST, read_output


def test_gguf_source_goes_through_a_temporary_folder(tiny_model, tmp_path, monkeypatch):
    calls = []

    def fake_gguf_to_hf(path, out_dir):
        calls.append((path, out_dir))
        return shutil.copytree(tiny_model("qwen2"), out_dir)

    monkeypatch.setattr(gguf, "gguf_to_hf", fake_gguf_to_hf)
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF" + bytes(1000))
    summary = quantize(src, tmp_path / "out", "w8a8_dynamic", **FAST)
    assert calls and calls[0][1].parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out"], "temporary HF folder removed"
    assert summary.source_bytes == 1004 and summary.linears["W8A8_DYNAMIC"] == 14
    desc, _ = read_output(tmp_path / "out")
    assert desc["model.layers.0.self_attn.q_proj.bias"] == "FLOAT"


def test_gguf_conversion_error_cleans_up(tmp_path, monkeypatch):
    def broken(path, out_dir):
        out_dir.mkdir()
        raise ValueError(f"cannot read GGUF file {path}: bad magic")

    monkeypatch.setattr(gguf, "gguf_to_hf", broken)
    src = tmp_path / "model.gguf"
    src.write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read GGUF"):
        quantize(src, tmp_path / "out", **FAST)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.slow
def test_real_smollm2_gguf(tmp_path):
    from slimquant.zoo import smollm2_gguf

    summary = quantize(smollm2_gguf(), tmp_path / "out", "w8a8", **FAST)
    # SmolLM2-135M: 30 layers of 7 linears; the default w8a8 recipe makes mlp.down_proj dynamic
    assert summary.linears["W8A8"] == 30 * 6 and summary.linears["W8A8_DYNAMIC"] == 30
