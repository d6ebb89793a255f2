"""Smoothing is an exact re-parameterisation; the quantized checkpoint stays close to the float model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimquant.format.architectures import SMOOTH_PAIRS
from slimquant.quant.decoder import BiasedNorm, replace_module
from slimquant.quant.observers import observe_inputs
from slimquant.quant.smooth import smooth_linear, smooth_norm, smooth_producer_linear, smoothing_factors
from tests.quant.common import calibration_ids, load_float, load_quantized, read_output


def smooth_model(model: nn.Module, ids: torch.Tensor, method: str, alpha: float) -> None:
    """Apply the quantizer's smoothing to every norm -> linears pair of a float transformers model."""
    n = model.config.num_hidden_layers
    firsts = [f"model.layers.{i}.{group[0]}" for i in range(n) for _, group in SMOOTH_PAIRS]
    with torch.no_grad(), observe_inputs(model, firsts) as ranges:
        model(ids)
    with torch.no_grad():
        for i in range(n):
            p = f"model.layers.{i}."
            for src, group in SMOOTH_PAIRS:
                lins = [model.get_submodule(p + rel) for rel in group]
                producer = model.get_submodule(p + src)
                how = "smoothquant" if isinstance(producer, nn.Linear) else method
                sm = smoothing_factors(ranges[p + group[0]], [lin.weight for lin in lins], alpha, how == "iterative")
                for lin in lins:
                    w, b = smooth_linear(lin.weight, lin.bias, sm)
                    lin.weight.copy_(w)
                    if b is not None:
                        lin.bias = nn.Parameter(b)
                if isinstance(producer, nn.Linear):
                    w, b = smooth_producer_linear(producer.weight, producer.bias, sm)
                    producer.weight.copy_(w)
                    if b is not None:
                        producer.bias = nn.Parameter(b)
                    continue
                w, b = smooth_norm(producer.weight, sm)
                producer.weight.copy_(w)
                if b is not None:
                    replace_module(model, p + src, BiasedNorm(producer, b))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["smoothquant", "iterative"])
def test_smoothing_leaves_logits_unchanged(tiny_model, arch, method):
    src = tiny_model(arch)
    ids = calibration_ids(src)
    model = load_float(src)
    with torch.no_grad():
        ref = model(ids).logits
    smooth_model(model, ids, method, alpha=0.5)
    scales = model.model.layers[0].input_layernorm
    assert isinstance(scales, BiasedNorm) == (method == "iterative")
    with torch.no_grad():
        got = model(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize(
    "arch,quant_type,method",
    [("llama", "w8a8", "iterative"), ("qwen2", "w8a8", "smoothquant"), ("qwen3", "w8a8_dynamic", "none")],
)
def test_quantized_model_close_to_float(quantized, arch, quant_type, method):
    src, dst, _ = quantized(arch, quant_type, anti_outlier=method)
    ids = calibration_ids(src, 2, 16)  # the calibration tokens themselves: static ranges cover them
    with torch.no_grad():
        ref = load_float(src)(ids).logits
        got = load_quantized(src, dst)(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
    if method == "iterative":
        desc = read_output(dst)[0]
        assert desc["model.layers.0.input_layernorm.bias"] == "FLOAT"
        assert desc["model.layers.0.self_attn.q_proj.bias"] == "FLOAT"


@pytest.mark.parametrize(
    "arch,quant_type,refused",
    [
        ("llama", "w8a8_dynamic", "model.layers.0.self_attn.q_proj"),  # bias-free q/k/v, dynamic
        ("qwen2", "w8a8_dynamic", "model.layers.0.mlp.gate_proj"),  # q/k/v have biases; gate/up do not
        ("deepseek_v3", "w8a8_dynamic", "model.layers.0.self_attn.q_a_proj"),
        ("llama", "w8a8", None),  # static q/k/v/gate/up: quant_bias carries the shift; down_proj is not shifted
        ("deepseek_v3", "w8a8", None),  # ModelSlim's DeepSeek recipe: iterative on static MLA linears
    ],
)
def test_iterative_shift_only_into_linears_that_can_carry_it(tiny_model, tmp_path, arch, quant_type, refused):
    """vLLM-Ascend drops a bias on a module its model builds without one: the shift must land in a quant_bias."""
    from slimquant.quant.pipeline import quantize
    from tests.quant.common import FAST

    run = lambda: quantize(tiny_model(arch), tmp_path / "q", quant_type, anti_outlier="iterative", **FAST)  # noqa: E731
    if refused is None:
        assert run().anti_outlier == "iterative"
        return
    with pytest.raises(ValueError, match=f"would give .* bias-free linears a bias \\(e.g. {refused}.*smoothquant"):
        run()
    assert not (tmp_path / "q").exists()
