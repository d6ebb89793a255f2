"""Quantization steps are plug-ins: a new one is a class and a registry line, and quantize() runs it by name."""

from __future__ import annotations

import pytest

from slimquant.quant import steps
from slimquant.quant.options import QuantizeOptions
from slimquant.quant.pipeline import quantize
from slimquant.quant.steps.rounding import NearestRounding
from slimquant.quant.steps.smoothing import SmoothQuant
from tests.quant.common import FAST

CALLS: list[str] = []


class CountingSmooth(SmoothQuant):
    """SmoothQuant that counts its groups (a stand-in for a new algorithm)."""

    name = "counting"

    def factors(self, rng, weights, alpha):
        CALLS.append("factors")
        return super().factors(rng, weights, alpha)


class CountingRounding(NearestRounding):
    name = "counting-round"

    def round(self, w, hessian=None):
        CALLS.append("round")
        return super().round(w, hessian)


def test_a_registered_step_runs_by_name(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(steps.SMOOTHERS, "counting", f"{__name__}:CountingSmooth")
    monkeypatch.setitem(steps.ROUNDERS, "counting-round", f"{__name__}:CountingRounding")
    CALLS.clear()
    summary = quantize(tiny_model("llama"), tmp_path / "q", "w8a8", anti_outlier="counting", rounding="counting-round",
                       **FAST)  # fmt: skip
    assert summary.anti_outlier == "counting"
    assert CALLS.count("factors") == 2 * 3  # 2 layers x 3 smoothing pairs (qkv, gate_up, down)
    assert CALLS.count("round") == 2 * 7  # every quantized linear of 2 layers


def test_unknown_steps_are_value_errors_that_name_the_choices():
    with pytest.raises(ValueError, match="unknown anti-outlier method 'awq'; choose one of: none, smoothquant"):
        QuantizeOptions(anti_outlier="awq")
    with pytest.raises(ValueError, match="unknown rounding 'ties'; choose one of: nearest, gptq"):
        QuantizeOptions(rounding="ties")


def test_options_are_immutable_and_parsed_once():
    opts = QuantizeOptions.parse("w8a8_dynamic", keep_float="*.down_proj", mix=["*.mlp.*=w8a8"], shard_size="1MB")
    assert opts.keep_float == ("*.down_proj",) and opts.shard_bytes == 10**6 and opts.mix == (("*.mlp.*", "W8A8"),)
    with pytest.raises(AttributeError):
        opts.alpha = 0.3  # frozen: a run cannot change its own settings
    with pytest.raises(TypeError, match="unexpected keyword argument.*anti_outliers"):
        QuantizeOptions.parse("w8a8", anti_outliers="none")
