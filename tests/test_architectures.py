"""The architecture registry's facts (format/architectures.py) against transformers' own modules."""

from __future__ import annotations

import json

import pytest
import torch

from slimquant.format.architectures import ARCHS
from slimquant.quant.decoder import LayerRunner
from slimquant.random_models import make_tiny_model


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
        ("qwen3", {"attention_bias": True}),
        ("qwen2_moe", {}),
        ("qwen2_moe", {"qkv_bias": False}),
        ("glm4_moe", {}),
        ("glm4_moe", {"attention_bias": False, "use_qk_norm": True}),
        ("deepseek_v3", {"attention_bias": True}),
        ("deepseek_v3", {"attention_bias": True, "q_lora_rank": None}),
        ("deepseek_v2", {}),
    ],
)
def test_which_linears_have_a_bias_is_transformers(tmp_path, arch, overrides):
    """ArchSpec.has_bias decides where an anti-outlier shift may land (vLLM drops biases its model lacks)."""
    src = make_tiny_model(arch, tmp_path, **overrides)
    config, spec = json.loads((src / "config.json").read_text()), ARCHS[arch]
    runner = LayerRunner(src, spec, torch.float32, "cpu")
    for i in range(config["num_hidden_layers"]):
        layer = runner._meta_layer(i)
        built = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
        assert {r for r in spec.layer_linears(config, i) if spec.has_bias(config, r)} == built, (arch, i)


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [2], "decoder_sparse_step": 1}),
        ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [], "decoder_sparse_step": 2}),
        ("glm4_moe", {"num_hidden_layers": 3, "first_k_dense_replace": 2}),
        ("deepseek_v3", {"num_hidden_layers": 4, "first_k_dense_replace": 2}),  # moe_layer_freq: vLLM's, not here
        ("glm4_moe_lite", {"num_hidden_layers": 4, "mlp_layer_types": ["dense", "sparse", "dense", "sparse"]}),
    ],
)
def test_which_layers_are_moe_is_transformers(tmp_path, arch, overrides):
    """is_moe_layer over config.json (as the quantizer reads it) against the layers transformers builds."""
    from slimquant.format.architectures import is_moe_layer

    src = make_tiny_model(arch, tmp_path, **overrides)
    config = json.loads((src / "config.json").read_text())
    runner = LayerRunner(src, ARCHS[arch], torch.float32, "cpu")
    built = [hasattr(runner._meta_layer(i).mlp, "experts") for i in range(config["num_hidden_layers"])]
    assert [is_moe_layer(config, i) for i in range(config["num_hidden_layers"])] == built
    assert any(built) and not all(built)


def test_a_multimodal_wrapper_is_refused_naming_its_text_model():
    """Kimi-K2.5 / K2.6 as transformers reads it: a kimi_k25 config around a DeepSeek-V3 text_config."""
    from transformers.models.kimi_k25 import Kimi_K25Config

    from slimquant.format.architectures import arch_spec

    for config in (Kimi_K25Config(), {"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2"}}):
        with pytest.raises(ValueError, match=r"'kimi_k25' .*it wraps a '(deepseek_v3|kimi_k2)' text model"):
            arch_spec(config)
    with pytest.raises(ValueError, match=r"architectures \[\]\); supported"):  # no wrapper: no word of one
        arch_spec({"model_type": "mamba"})
