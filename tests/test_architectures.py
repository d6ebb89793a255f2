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
