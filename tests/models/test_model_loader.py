"""Loader behaviour: dtype resolution, ascend detection, tied embeddings, rope variants."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimquant.format.dtypes import DTYPE_NAMES as CONFIG_DTYPES
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.quant_methods import W8A8DynamicMethod
from slimquant.layers.rotary import inverse_frequencies, rope_parameters
from slimquant.models.loader import load_model, resolve_dtype
from slimquant.random_models import make_tiny_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_word_embeddings": True},
        {"rope_parameters": LLAMA3_ROPE},
        {"rope_parameters": {**LLAMA3_ROPE, "rope_type": "linear"}},
    ],
    ids=["tied", "llama3", "linear"],
)
def test_llama_variants_match_transformers(tmp_path, overrides):
    folder = make_tiny_model("llama", tmp_path, **overrides)  # the fixture's cache key cannot hold dicts
    runner = PagedRunner.of(load_model(str(folder)), torch.float32)
    logits = torch.cat([runner.step({0: PROMPT[:5]}), *[runner.step({0: [t]}) for t in PROMPT[5:]]])
    assert_close(logits, hf_logits(folder, PROMPT))


def test_llama3_frequencies_equal_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(LLAMA3_ROPE))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    assert torch.allclose(inverse_frequencies(16, rope_parameters(config)), expected)


def test_old_style_rope_config():
    config = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    params = rope_parameters(config)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 1e6


def test_dtype_resolution(tiny_model):
    config = SimpleNamespace(dtype="bfloat16")
    assert resolve_dtype("auto", config) == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace()) == torch.float32
    assert resolve_dtype(torch.float16, config) == torch.float16
    assert resolve_dtype("float32", config) == torch.float32
    loaded = load_model(str(tiny_model("llama", dtype=torch.bfloat16)), dtype="float32")
    assert loaded.dtype == torch.float32 and loaded.model.model.norm.weight.dtype == torch.float32
    assert loaded.model.model.embed_tokens(torch.tensor([1, 2])).dtype == torch.float32  # table may be held as bf16


@pytest.mark.parametrize("name", CONFIG_DTYPES)
def test_every_dtype_the_config_accepts_resolves(name):
    """Each dtype name the engine config accepts (vLLM's 'half' and 'float' among them) resolves to its dtype."""
    got = resolve_dtype(name, SimpleNamespace(dtype="bfloat16"))
    expected = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32", "bf16": "bfloat16"}
    assert got == (torch.bfloat16 if name == "auto" else getattr(torch, expected.get(name, name)))


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_half_support(monkeypatch, native, expected):
    monkeypatch.setattr("slimquant.models.loader.has_native_half", lambda: native)
    config = SimpleNamespace(dtype="bfloat16")
    assert resolve_dtype("auto", config, "cpu") == expected
    assert resolve_dtype("auto", config, "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", config, "cpu") == torch.bfloat16  # an explicit dtype is kept


@pytest.mark.parametrize("kernels_on", [True, False])
def test_auto_dtype_of_int8_checkpoint_on_cpu_is_the_native_kernels_dtype(monkeypatch, kernels_on):
    monkeypatch.setattr("slimquant.models.loader.has_native_half", lambda: True)
    config = SimpleNamespace(dtype="bfloat16")
    expected = torch.float32 if kernels_on else torch.bfloat16
    assert resolve_dtype("auto", config, "cpu", quantized=True, native=kernels_on) == expected
    assert resolve_dtype("auto", config, "cpu", quantized=False, native=kernels_on) == torch.bfloat16
    assert resolve_dtype("bfloat16", config, "cpu", quantized=True, native=kernels_on) == torch.bfloat16


def test_ascend_folder_detected_and_logged(tiny_model, tmp_path, caplog):
    dst = write_ascend(tiny_model("llama"), tmp_path / "q", lambda p: "W8A8_DYNAMIC")
    with caplog.at_level(logging.INFO, logger="slimquant.models.loader"):
        loaded = load_model(str(dst))
    assert loaded.quantized and "ascend" in caplog.text
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj.method, W8A8DynamicMethod)


def test_cache_shapes(tiny_model):
    model = load_model(str(tiny_model("qwen3"))).model
    layers = [m for m in model.modules() if isinstance(m, KVCacheLayer)]
    assert len(layers) == 2 and all(m.cache_shape(10, 16) == (2, 10, 16, 2, 16) for m in layers)


def test_extra_checkpoint_tensors_are_ignored(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model("qwen2"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, folder / "model.safetensors")
    assert_close(PagedRunner.of(load_model(str(folder)), torch.float32).step({0: PROMPT}), hf_logits(folder, PROMPT))
