"""GPTQ rounding: lower layer-output error than round-to-nearest, same scales and int8 range, same format."""

from __future__ import annotations

import pytest
import torch

from slimquant import LLM, SamplingParams
from slimquant.format import primitives as P
from slimquant.quant.gptq import gptq_quantize
from slimquant.quant.observers import SecondMoment
from slimquant.quant.pipeline import quantize
from tests.quant.common import FAST, calibration_ids, load_float, load_quantized, read_output
from tests.quant.test_quant_format import check_output


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """x [n, k] whose channels mix a few shared factors (strongly correlated), with a few large channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)
    return x * (1 + 4 * (torch.arange(k) % 17 == 0))  # [n, k]


def output_error(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> float:
    """||x W_deq^T - x W^T||^2 / ||x W^T||^2."""
    ref = x @ w.t()
    return float((x @ P.dequantize_weight(w_q, scale).t() - ref).pow(2).sum() / ref.pow(2).sum())


def moment_of(x: torch.Tensor) -> SecondMoment:
    m = SecondMoment()
    for part in x.split(100):
        m.update(part)
    return m


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_nearest_with_same_scales_and_range(act_order):
    g = torch.Generator().manual_seed(1)
    x, w = correlated_inputs(512, 200), torch.randn(48, 200, generator=g)  # K = 200: two blocks of 128
    w_q, scale = gptq_quantize(w, moment_of(x).hessian(), act_order=act_order)
    rtn_q, rtn_scale = P.quantize_weight(w)
    assert w_q.dtype == torch.int8 and w_q.shape == w.shape
    assert torch.equal(scale, rtn_scale)
    assert int(w_q.abs().max()) <= 127 and int(rtn_q.abs().max()) <= 127  # quantize_weight's values
    gptq, rtn = output_error(x, w, w_q, scale), output_error(x, w, rtn_q, rtn_scale)
    assert gptq < 0.5 * rtn, (gptq, rtn)


def test_gptq_dead_input_rounds_to_nearest():
    x, w = correlated_inputs(256, 64), torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    x[:, 5] = 0.0  # a channel that never fires
    w_q, scale = gptq_quantize(w, moment_of(x).hessian())
    assert torch.equal(w_q[:, 5], P.quantize_weight(w)[0][:, 5])


def test_hessian_in_smoothed_coordinates_is_exact():
    x = correlated_inputs(300, 32).double().float()
    g = torch.Generator().manual_seed(3)
    shift, scale = torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.5  # [K]
    xs = (x - shift) / scale  # [n, K]
    want = 2 * xs.double().t() @ xs.double() / x.shape[0]
    torch.testing.assert_close(moment_of(x).hessian(shift, scale).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant_type,method", [("w8a8", "smoothquant"), ("w8a8_dynamic", "none")])
def test_gptq_checkpoint_format_and_quality(tiny_model, tmp_path, quant_type, method):
    src = tiny_model("llama")
    outs = {}
    for rounding in ("nearest", "gptq"):
        outs[rounding] = tmp_path / rounding
        # static_all: every linear of the type, down_proj (checked below) included
        quantize(src, outs[rounding], quant_type, anti_outlier=method, rounding=rounding, static_all=True, **FAST)
    check_output(src, outs["gptq"], lambda name: quant_type.upper(), torch.float32)
    _, t = read_output(outs["gptq"])
    _, ref = read_output(outs["nearest"])
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(t[name + ".weight_scale"], ref[name + ".weight_scale"])  # same smoothing, same scales
    assert not torch.equal(t[name + ".weight"], ref[name + ".weight"])
    ids = calibration_ids(src, 2, 16)
    with torch.no_grad():
        want = load_float(src)(ids).logits
        got = load_quantized(src, outs["gptq"])(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 0.05


def test_gptq_checkpoint_runs_in_the_engine(quantized):
    _, dst, _ = quantized("qwen2", "w8a8", rounding="gptq")
    llm = LLM(str(dst), max_model_len=64, dtype="float32")
    out = llm.generate(["hello world"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_rounding(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown rounding 'foo'; choose one of: nearest, gptq"):
        quantize(tiny_model("llama"), tmp_path / "out", rounding="foo", **FAST)
    assert not (tmp_path / "out").exists()
