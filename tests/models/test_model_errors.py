"""User errors surface as ValueErrors that name the problem (never a bare KeyError)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file

from slimquant.layers.rotary import inverse_frequencies
from slimquant.models.loader import load_model
from slimquant.models.registry import model_class
from tests.models.ascend_ckpt import write_ascend


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensors_are_listed(tiny_model, tmp_path):
    folder = _copy(tiny_model("llama"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing") as e:
        load_model(str(folder))
    assert "model.layers.1.mlp.down_proj.weight" in str(e.value) and "model.norm.weight" in str(e.value)


def test_missing_folder_or_config(tmp_path):
    with pytest.raises(ValueError, match="not found: slimquant loads local folders only"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(tmp_path))


def test_quantized_weights_without_their_description(tiny_model, tmp_path):
    dst = write_ascend(tiny_model("llama"), tmp_path / "q", lambda p: "W8A8_DYNAMIC")
    (dst / "quant_model_description.json").unlink()
    with pytest.raises(ValueError, match="quantized weights .* but no quant_model_description.json"):
        load_model(str(dst))


def test_shards_with_different_quant_types(tiny_model, tmp_path):
    src = tiny_model("llama")
    dst = write_ascend(src, tmp_path / "q", lambda p: "W8A8_DYNAMIC" if p.endswith("k_proj") else "W8A8")
    with pytest.raises(ValueError, match="Not all shards .*qkv_proj.* same quant type"):
        load_model(str(dst))


def test_some_but_not_all_shards_float(tiny_model, tmp_path):
    src = tiny_model("llama")
    dst = write_ascend(src, tmp_path / "q", lambda p: "FLOAT" if p.endswith("up_proj") else "W8A8")
    with pytest.raises(ValueError, match="Detected some but not all shards .*gate_up_proj"):
        load_model(str(dst))


def test_description_lacking_a_key(tiny_model, tmp_path):
    dst = write_ascend(tiny_model("llama"), tmp_path / "q", lambda p: "W8A8")
    desc_file = dst / "quant_model_description.json"
    desc = json.loads(desc_file.read_text())
    del desc["model.layers.0.self_attn.q_proj.weight"]
    desc_file.write_text(json.dumps(desc))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.weight") as e:
        load_model(str(dst))
    assert "language_model." in str(e.value) and "MTP" in str(e.value)


def test_unsupported_architecture_lists_supported(tiny_model, tmp_path):
    config = SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        model_class(config)
    folder = _copy(tiny_model("llama"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*MistralForCausalLM"):
        load_model(str(folder))


def test_ascend_requested_on_float_folder(tiny_model):
    with pytest.raises(ValueError, match="no quant_model_description.json.*slimquant quantize"):
        load_model(str(tiny_model("llama")), quantization="ascend")


@pytest.mark.parametrize("kwargs", [{"quantization": "gptq"}, {"dtype": "int8"}, {"dtype": "fp8"}])
def test_bad_options(tiny_model, kwargs):
    with pytest.raises(ValueError, match="quantization|dtype"):
        load_model(str(tiny_model("llama")), **kwargs)


@pytest.mark.parametrize("method", ["fp8", "compressed-tensors", "gptq"])
def test_a_quantized_release_is_not_loaded_as_float(tiny_model, tmp_path, method):
    """An FP8 (or other quantized) release loaded as float would take its weights without their scales: refused,
    with the conversion that reads it."""
    folder = tmp_path / "release"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": method}}))
    with pytest.raises(ValueError, match=f"is a '{method}'-quantized release .* `slimquant quantize "):
        load_model(str(folder))


def test_unsupported_rope_type():
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported.*llama3"):
        inverse_frequencies(16, {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0})


@pytest.mark.parametrize(
    "header,match",
    [
        ({"fa_quant_type": "FAKQuant"}, "fa_quant_type='FAKQuant': quantized attention"),
        ({"reduce_quant_type": "per_channel"}, "reduce_quant_type='per_channel'"),
        ({"kv_cache_type": "C4"}, "kv_cache_type='C4': slimquant runs int8 KV caches of type 'C8' only"),
        ({"kv_cache_type": "C8"}, "tensors are missing .*self_attn.k_proj.kv_cache_scale"),  # C8 without its scales
    ],
)
def test_features_slimquant_cannot_run_are_refused_by_name(tiny_model, tmp_path, header, match):
    dst = write_ascend(tiny_model("llama"), tmp_path / "q", lambda p: "W8A8_DYNAMIC")
    desc_file = dst / "quant_model_description.json"
    desc_file.write_text(json.dumps(json.loads(desc_file.read_text()) | header))
    with pytest.raises(ValueError, match=match):
        load_model(str(dst))


@pytest.mark.parametrize("qtype", ["W4A8_DYNAMIC", "W4A16", "W8A8_MIX"])
def test_linear_types_slimquant_cannot_run_are_refused_by_name(tiny_model, tmp_path, qtype):
    dst = write_ascend(tiny_model("llama"), tmp_path / "q", lambda p: "W8A8_DYNAMIC")
    desc_file = dst / "quant_model_description.json"
    desc = json.loads(desc_file.read_text())
    desc |= {k: qtype for k in desc if k.startswith("model.layers.0.self_attn.o_proj.")}
    desc_file.write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=f"o_proj: quant type '{qtype}' is not supported; supported: .*W8A8"):
        load_model(str(dst))


@pytest.mark.parametrize(
    "arch,kv_cache,tensor,value",
    [
        ("llama", "sym", "model.layers.1.self_attn.k_proj.kv_cache_scale", float("nan")),
        ("llama", "sym", "model.layers.0.self_attn.v_proj.kv_cache_offset", 3.5),
        ("deepseek_v3", None, "model.layers.1.mlp.experts.2.up_proj.weight_scale", float("inf")),
        ("deepseek_v3", None, "model.layers.1.mlp.experts.0.down_proj.weight_scale", -1.0),
    ],
)
def test_corrupt_scales_are_refused_by_name(tiny_model, tmp_path, arch, kv_cache, tensor, value):
    """NaN / infinite / negative scales and fractional offsets: a clear error naming the tensor, not nonsense."""
    import torch

    qtype = lambda p: "W8A8_DYNAMIC" if ".mlp." in p else "W8A8"  # noqa: E731
    dst = write_ascend(tiny_model(arch, torch.bfloat16), tmp_path / "q", qtype, torch.bfloat16, kv_cache=kv_cache)
    (shard,) = dst.glob("*.safetensors")
    tensors = load_file(shard)
    tensors[tensor] = torch.full_like(tensors[tensor], value)
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=f"{tensor} (holds|must hold)"):
        load_model(str(dst))
