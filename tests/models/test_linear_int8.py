"""TorchOps' int8 products (the definition every backend equals) and the fused Linear's quant methods, at odd
sizes."""

from __future__ import annotations

import logging

import pytest
import torch

from slimquant.backends.torch_ops import TorchOps, quantize_static
from slimquant.format import primitives as P
from slimquant.layers.linear import Linear
from slimquant.layers.quant_config import AscendQuantConfig


@pytest.mark.parametrize("t,k,n", [(1, 64, 32), (17, 1025, 33), (3, 5, 7)])
def test_int8_mm_is_exact(t, k, n):
    gen = torch.Generator().manual_seed(t)
    x_q = torch.randint(-128, 128, (t, k), dtype=torch.int8, generator=gen)
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    ops = TorchOps()
    assert torch.equal(ops.int8_mm(x_q, w_q), P.int8_matmul_reference(x_q, w_q))  # int8 weights: torch._int_mm
    assert torch.equal(ops.int8_mm(x_q, ops.pack_weight(w_q)), P.int8_matmul_reference(x_q, w_q))  # exact fp32


def test_packed_mm_exact_at_extreme_values():
    # all -128: every product is 2^14, the worst case for fp32 accumulation over K-chunks
    x_q = torch.full((2, 2100), -128, dtype=torch.int8)
    w_q = torch.full((3, 2100), -128, dtype=torch.int8)
    expected = torch.full((2, 3), 2100 * 128 * 128, dtype=torch.int32)
    ops = TorchOps()
    assert torch.equal(ops.int8_mm(x_q, ops.pack_weight(w_q)), expected)


def test_quantize_static_matches_primitives():
    x = torch.randn(17, 1025) * 3
    scale, offset = P.static_activation_params(-2.0, 5.0)
    s, o = torch.tensor([scale]), torch.tensor([offset])
    assert torch.equal(quantize_static(x, 1.0 / s, o), P.quantize_static(x, s, o))


def _static_qkv(scales: list[float], process: bool = True) -> Linear:
    """A fused 3-shard W8A8 linear loaded with per-shard input scales."""
    shards = ["q_proj", "k_proj", "v_proj"]
    config = AscendQuantConfig({f"a.{s}.weight": "W8A8" for s in shards})
    layer = Linear(
        8, [4, 2, 2], bias=False, quant_config=config, prefix="a.qkv_proj", shards=shards, dtype=torch.float32
    )
    for i, scale in enumerate(scales):
        w_q, w_s = P.quantize_weight(torch.randn(layer.out_sizes[i], 8))
        deq = P.deq_scale(scale, w_s, torch.float32)
        tensors = dict(weight=w_q, weight_scale=w_s, weight_offset=torch.zeros_like(w_s), deq_scale=deq)
        tensors.update(input_scale=torch.tensor([scale]), input_offset=torch.tensor([3.0]))
        tensors["quant_bias"] = P.quant_bias(None, deq, w_q, 3.0)
        for name, t in tensors.items():
            layer.load_shard(name, i, t)
    if process:
        layer.process_weights_after_loading()
    return layer


def test_fused_static_shards_with_different_input_scales_use_the_last(caplog):
    with caplog.at_level(logging.WARNING):
        layer = _static_qkv([0.02, 0.02, 0.05])
    assert "different input_scale" in caplog.text
    assert torch.allclose(layer.input_inv_scale, torch.tensor([1 / 0.05]))


def test_float_tensor_for_int8_weight_is_rejected():
    layer = _static_qkv([0.02] * 3, process=False)
    with pytest.raises(ValueError, match="a.k_proj.weight is stored as torch.float32, where the format has torch.int8"):
        layer.load_shard("weight", 1, torch.randn(2, 8))


def test_dynamic_weight_scale_rounded_to_model_dtype():
    config = AscendQuantConfig({"o.weight": "W8A8_DYNAMIC"})
    layer = Linear(8, [4], bias=True, quant_config=config, prefix="o", dtype=torch.bfloat16)
    w_q, w_s = P.quantize_weight(torch.randn(4, 8))
    for name, t in dict(weight=w_q, weight_scale=w_s, weight_offset=0 * w_s, bias=torch.randn(4)).items():
        layer.load_shard(name, 0, t)
    layer.process_weights_after_loading()
    assert torch.equal(layer.weight_scale, w_s.to(torch.bfloat16).float().reshape(4))  # rounded, held in fp32
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    x_q, s_t = P.quantize_per_token(x)
    ref = (x_q.double() @ w_q.double().T) * w_s.to(torch.bfloat16).double().T * s_t.double() + layer.bias.double()
    assert torch.allclose(layer(x).double(), ref.to(torch.bfloat16).double(), rtol=1e-2)
