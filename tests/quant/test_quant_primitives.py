"""The runtime reference math the quantizer simulates: exact int8 GEMM, W8A8 static and dynamic linears."""

from __future__ import annotations

import pytest
import torch

from slimquant.format import primitives as P


@pytest.mark.parametrize("t,k,n", [(1, 1, 1), (17, 1025, 33), (5, 3000, 7)])
def test_int8_matmul_exact(t, k, n):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-128, 128, (t, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    assert torch.equal(P.int8_matmul_exact(x, w), (x.long() @ w.long().t()).double())
    worst = torch.full((2, k), -128, dtype=torch.int8)
    assert P.int8_matmul_exact(worst, worst)[0, 0].item() == k * 16384


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_linear_matches_formula(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 40, generator=g).to(dtype)  # [B, T, K]
    w_q, w_s = P.quantize_weight(torch.randn(24, 40, generator=g))
    bias = torch.randn(24, generator=g)
    scale, offset = P.static_activation_params(float(x.min()), float(x.max()))
    in_s, in_o = torch.tensor([scale]), torch.tensor([offset])
    deq = P.deq_scale(scale, w_s, dtype)
    qb = P.quant_bias(bias, deq, w_q, offset)
    inv = (1.0 / in_s).to(dtype)
    x_q = torch.clamp(torch.round(x * inv + in_o.to(dtype)), -128, 127).long()  # [B, T, K]
    want = ((x_q @ w_q.long().t() + qb.long()).double() * P.decode_deq_scale(deq).double()).to(dtype)
    assert torch.equal(P.static_linear(x, w_q, qb, deq, in_s, in_o), want)
    ref = (x.double() @ (w_q.double() * w_s.double()).t() + bias.double()).to(dtype)
    assert ((want.double() - ref.double()).norm() / ref.double().norm()).item() < 0.03  # int8 is close


def test_dynamic_linear_matches_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g).to(torch.bfloat16)  # [T, K]
    w_q, w_s = P.quantize_weight(torch.randn(24, 40, generator=g))
    bias = torch.randn(24, generator=g).to(torch.bfloat16)
    s_t = x.float().abs().amax(-1, keepdim=True) / 127  # [T, 1]
    x_q = torch.round(x.float() / s_t).long()
    acc = (x_q @ w_q.long().t()).double()
    want = (acc * w_s.to(torch.bfloat16).double().t() * s_t.double() + bias.double()).to(torch.bfloat16)
    assert torch.equal(P.dynamic_linear(x, w_q, w_s, bias), want)
