"""The quantization math against hand-computed values of docs/FORMAT.md's formulas."""

import torch

from slimquant.format import primitives as P


def test_weight_roundtrip_within_half_step():
    w = torch.randn(17, 33)
    w_q, s = P.quantize_weight(w)
    assert w_q.dtype == torch.int8 and s.shape == (17, 1)
    err = (P.dequantize_weight(w_q, s) - w).abs()
    assert (err <= s / 2 + 1e-7).all()
    assert (w_q.abs().amax(dim=1) == 127).all()


def test_static_params_cover_range():
    scale, offset = P.static_activation_params(-3.0, 5.0)
    assert abs(scale - 8.0 / 255) < 1e-9
    assert offset == round(3.0 / scale) - 128
    x = torch.tensor([-3.0, 0.0, 5.0])
    q = P.quantize_static(x, torch.tensor([scale]), torch.tensor([offset]))
    assert q.tolist()[0] == -128 and q.tolist()[2] == 127
    back = (q.float() - offset) * scale
    assert (back - x).abs().max() <= scale / 2 + 1e-6


def test_deq_scale_encodings():
    ws = torch.rand(5, 1)
    d_bf16 = P.deq_scale(0.5, ws, torch.bfloat16)
    d_fp16 = P.deq_scale(0.5, ws, torch.float16)
    assert d_bf16.dtype == torch.float32 and d_fp16.dtype == torch.int64
    assert torch.equal(P.decode_deq_scale(d_fp16), d_bf16)
    assert torch.allclose(d_bf16, 0.5 * ws.reshape(-1))


def test_quant_bias_folds_offset():
    w_q = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
    deq = torch.full((4,), 0.01)
    bias = torch.randn(4)
    qb = P.quant_bias(bias, deq, w_q, 3.0)
    expected = torch.round(bias.double() / 0.01 - w_q.double().sum(1) * 3.0)
    assert torch.equal(qb, expected.to(torch.int32))


def test_per_token_quant():
    x = torch.randn(7, 19)
    x_q, s = P.quantize_per_token(x)
    assert s.shape == (7, 1)
    assert ((x_q.float() * s - x).abs() <= s / 2 + 1e-6).all()
