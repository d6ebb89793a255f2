"""`slimquant quantize --kv-cache int8`: per-channel C8 scales from the keys (after RoPE; a pair's norm) and values
that the quantized model computes on the calibration set, written as ModelSlim's V1 saver writes them."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from slimquant.quant.decoder import cache_argument
from slimquant.quant.pipeline import quantize
from tests.quant.common import FAST, calibration_ids, load_quantized, read_output


class AmaxCache(DynamicCache):
    """transformers' cache, also recording per layer the range of k (its RoPE pair's norm: every position fits)
    and of v per channel ([B, KVH, T, D])."""

    def __init__(self):
        super().__init__()
        self.amax: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        half = k.shape[-1] // 2
        pair = torch.hypot(k[..., :half], k[..., half:]).amax(dim=(0, 2))  # a RoPE pair's norm: [KVH, D/2]
        self.amax[layer_idx] = (torch.cat([pair, pair], -1).flatten(), v.abs().amax(dim=(0, 2)).flatten())
        return super().update(k, v, layer_idx, *args, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scales_are_the_quantized_models_kv_ranges(tiny_model, tmp_path, arch):
    src, dst = tiny_model(arch), tmp_path / "q"
    summary = quantize(src, dst, "w8a8_dynamic", kv_cache="int8", **FAST)
    desc, tensors = read_output(dst)
    assert desc["kv_cache_type"] == desc["kv_quant_type"] == "C8" and summary.kv_cache == "int8 (C8)"
    model, ids = load_quantized(src, dst), calibration_ids(src, FAST["num_samples"], FAST["seq_len"])
    cache = AmaxCache()
    with torch.no_grad():
        # the whole calibration batch: every layer's k / v ranges
        model.model(ids, **{cache_argument(model.model.forward): cache}, use_cache=True)
    assert len(cache.amax) == model.config.num_hidden_layers
    for i, (k_amax, v_amax) in cache.amax.items():
        for proj, amax in (("k_proj", k_amax), ("v_proj", v_amax)):
            stem = f"model.layers.{i}.self_attn.{proj}.kv_cache_"
            scale, offset = tensors[stem + "scale"], tensors[stem + "offset"]
            assert desc[stem + "scale"] == desc[stem + "offset"] == "C8"
            assert scale.dtype == torch.float32 and offset.dtype == torch.int32 and not offset.any()
            torch.testing.assert_close(scale, amax / 127, rtol=1e-3, atol=1e-6)


def test_mla_models_are_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="MLA"):
        quantize(tiny_model("deepseek_v3"), tmp_path / "q", "w8a8_dynamic", kv_cache="int8", **FAST)
    assert not (tmp_path / "q").exists()


def test_unknown_kv_cache_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="kv cache must be one of"):
        quantize(tiny_model("llama"), tmp_path / "q", kv_cache="fp8", **FAST)


def test_the_cache_goes_under_the_name_the_installed_transformers_takes():
    """transformers 5.2x renamed past_key_values to cache; a layer drops a cache passed under a name it does not
    take (**kwargs), and the k / v ranges would never be seen (the C8 quantize failed on transformers 5.17)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

    def old(hidden_states, past_key_values=None, **kwargs): ...

    def older(hidden_states, past_key_value=None, **kwargs): ...

    assert cache_argument(old) == "past_key_values" and cache_argument(older) == "past_key_value"
    for forward in (LlamaDecoderLayer.forward, LlamaModel.forward):  # this transformers' (decorated) forwards
        assert cache_argument(forward) in inspect.signature(forward).parameters
