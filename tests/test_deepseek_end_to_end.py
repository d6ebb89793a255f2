"""DeepSeek V2 / V3 end to end: quantize with the default mixed recipe, then run float and int8 side by side."""

from __future__ import annotations

import pytest
import torch

from slimquant import LLM, SamplingParams, quantize
from slimquant.evaluation import evaluate
from slimquant.random_models import make_tiny_model

PROMPTS = ["Hello, my name is", "The capital of France is", "It is a truth universally", "Numbers: 0 1 2"]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 6


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def float_and_quantized(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = make_tiny_model(request.param, root / "float", dtype=torch.bfloat16)
    quantize(src, root / "w8a8", "w8a8", progress=False)  # MLA static W8A8, MLP and experts W8A8_DYNAMIC
    return src, root / "w8a8"


def _greedy(path, **kw) -> list[list[int]]:
    llm = LLM(str(path), max_model_len=128, dtype="float32", **kw)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_quantized_greedy_agrees_with_float_on_most_tokens(float_and_quantized):
    src, dst = float_and_quantized
    ref, quant = _greedy(src), _greedy(dst, quantization="ascend")
    same = sum(a == b for x, y in zip(ref, quant, strict=True) for a, b in zip(x, y, strict=True))
    assert same > 0.5 * 16 * len(PROMPTS)


def test_quantized_next_token_agreement_and_perplexity(float_and_quantized):
    float_res, quant_res = evaluate(
        [str(p) for p in float_and_quantized], TEXT, context=64, dtype="float32", progress=False
    )
    assert quant_res.top1_agreement > 0.8
    assert quant_res.perplexity < float_res.perplexity * 1.1


def test_bfloat16_latent_cache_matches_fp32_cache(float_and_quantized):
    """The MLA latent cache in bf16 (kv_cache_dtype) with fp32 activations: logprobs agree with those of the fp32
    cache within 0.1 (bf16 rounding of the latents, which can move a static int8 activation by a step), at every
    step while the greedy tokens agree. MLA's prefill reads its latents back from the cache too, so even a first
    token can flip where a tiny random model has a near tie: the first step is compared through each run's top-5."""
    _, dst = float_and_quantized
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    runs = []
    for kv_dtype in ("auto", "bfloat16"):
        llm = LLM(str(dst), quantization="ascend", max_model_len=128, dtype="float32", kv_cache_dtype=kv_dtype)
        runs.append([o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)])
    compared = 0
    for a, b in zip(*runs, strict=True):
        steps = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y), 16)
        for i in range(max(steps, 1)):
            token = a.token_ids[i]
            assert token in b.logprobs[i], "the fp32 cache's token is not even in the bf16 cache's top 5"
            assert abs(a.logprobs[i][token].logprob - b.logprobs[i][token].logprob) < 0.1
            compared += 1
    assert compared >= 24
