"""Perplexity windows and scores against transformers on a tiny model."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimquant import LLM, SamplingParams
from slimquant.backends import select
from slimquant.evaluation import evaluate, token_windows
from slimquant.kernels import native
from tests.models.ascend_ckpt import write_ascend

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 12


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (17, 5, 3), (3, 8, 8), (9, 9, 1)])
def test_overlapping_windows_score_every_token_once(n, context, stride):
    scored = []
    for start, end, first in token_windows(n, context, stride):
        assert end - start <= context and start < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_disjoint_windows_skip_only_each_window_start():
    windows = token_windows(10, 4, 4)
    assert windows == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


def test_bad_window_arguments():
    with pytest.raises(ValueError, match="stride"):
        token_windows(10, 4, 5)


def _reference_nll(path, ids, windows):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    nll, preds = [], []
    with torch.no_grad():
        for start, end, first in windows:
            logits = model(ids[start:end][None]).logits[0, :-1]
            keep = slice(first - start - 1, None)
            nll.append(torch.nn.functional.cross_entropy(logits, ids[start + 1 : end], reduction="none")[keep])
            preds.append(logits.argmax(-1)[keep])
    return torch.cat(nll), torch.cat(preds)


def test_perplexity_matches_transformers(tiny_model):
    a, b = str(tiny_model("llama")), str(tiny_model("qwen2"))
    ids = torch.tensor(AutoTokenizer.from_pretrained(a)(TEXT).input_ids)
    windows = token_windows(len(ids), 32, 16)
    results = evaluate([a, b], TEXT, context=32, stride=16, progress=False)
    nll_a, pred_a = _reference_nll(a, ids, windows)
    nll_b, pred_b = _reference_nll(b, ids, windows)
    assert results[0].tokens == len(ids) - 1
    assert math.isclose(results[0].perplexity, math.exp(nll_a.mean()), rel_tol=1e-4)
    assert math.isclose(results[1].perplexity, math.exp(nll_b.mean()), rel_tol=1e-4)
    assert results[0].top1_agreement is None
    assert math.isclose(results[1].top1_agreement, (pred_a == pred_b).float().mean().item(), abs_tol=1e-6)


def test_change_interval_is_the_paired_t_interval():
    """Windows' mean NLL differences 0.01, 0.03, 0.02, 0.04 (mean 0.025, sd 0.0129, t(3) 3.182): the change's
    interval is exp(0.025 -+ 3.182 * 0.0129 / 2) - 1, computed here from the definition."""
    from slimquant.stats import change_interval

    base = torch.tensor([2.0, 3.0, 2.5, 4.0], dtype=torch.float64)
    diff = torch.tensor([0.01, 0.03, 0.02, 0.04], dtype=torch.float64)
    sd = math.sqrt(sum((d - 0.025) ** 2 for d in diff.tolist()) / 3)
    low, high = change_interval(base, base + diff)
    assert math.isclose(low, math.exp(0.025 - 3.182 * sd / 2) - 1, rel_tol=1e-9)
    assert math.isclose(high, math.exp(0.025 + 3.182 * sd / 2) - 1, rel_tol=1e-9)
    assert change_interval(base[:1], base[:1]) is None  # one window: no spread to measure


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_norms_move_by_1e6_or_one_ulp(dtype):
    from slimquant.evaluation import perturb_norms
    from slimquant.layers.norm import RMSNorm

    norm = RMSNorm(4, 1e-6, dtype)
    norm.weight.data.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    before = norm.weight.data.clone()
    perturb_norms(norm)
    change = (norm.weight.data.double() / before.double() - 1).abs()
    if dtype == torch.float32:  # 1e-6 fits: moved by it (to float32's rounding)
        assert torch.allclose(change, torch.full_like(change, 1e-6), rtol=0.1)
    else:  # bf16 cannot move by 1e-6: one unit in the last place, away from zero (2^-7 relative at 1.0)
        assert torch.equal(norm.weight.data.abs() > before.abs(), torch.ones(4, dtype=torch.bool))
        assert change.max() <= 2**-7


def test_eval_reports_interval_and_sensitivity(tiny_model):
    a = str(tiny_model("llama"))
    results = evaluate([a, a], TEXT, context=32, progress=False, sensitivity=True)
    assert results[1].windows > 1 and results[1].change_interval == (0.0, 0.0)  # the same model: no change
    assert results[0].change_interval is None
    assert all(r.sensitivity is not None and 0 < r.sensitivity < 1e-3 for r in results)  # float: tiny but moved


def test_sensitivity_scales_with_the_perturbation_on_a_float_model(tiny_model):
    """A float model's perplexity moves in proportion to its norms' change (an int8 one does not: see
    docs/benchmarks.md); a perturbation outside (0, 0.01] is refused."""
    a = str(tiny_model("llama"))
    small, large = (
        evaluate([a], TEXT, context=32, progress=False, sensitivity=True, perturbation=rel)[0].sensitivity
        for rel in (1e-6, 1e-4)
    )
    assert 30 < large / small < 300
    for bad in (0.0, 0.5):
        with pytest.raises(ValueError, match="relative change of the norm weights"):
            evaluate([a], TEXT, context=32, progress=False, sensitivity=True, perturbation=bad)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
@pytest.mark.parametrize("bf16_attention", [False, True])
def test_eval_scores_an_int8_model_as_the_engine_runs_it(tiny_model, tmp_path, monkeypatch, bf16_attention):
    """An int8 checkpoint of a bf16 model on the cpu-native backend: fp32 activations over a bf16 KV cache, whose
    prefill attends in bf16 on a CPU with native bf16 (faked either way here). eval (dtype auto) scores it with the
    engine's cache and attention: its NLL equals the engine's prompt logprobs'."""
    monkeypatch.setattr(select, "has_native_half", lambda: bf16_attention)
    path = str(write_ascend(tiny_model("llama", torch.bfloat16), tmp_path / "int8", lambda prefix: "W8A8_DYNAMIC"))
    ids = AutoTokenizer.from_pretrained(path)(TEXT).input_ids[:48]
    llm = LLM(path, max_model_len=64, enable_prefix_caching=False, kernels={"backend": "cpu-native"})
    assert ("attends in bf16" in llm.llm_engine.runner.backend.describe()) == bf16_attention
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate([ids], params, use_tqdm=False)[0]
    served = [-step[t].logprob for step, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    result = evaluate([path], TEXT, context=64, max_tokens=48, progress=False)[0]
    assert result.tokens == 47
    assert math.isclose(result.mean_nll, sum(served) / len(served), rel_tol=1e-6)


def test_score_window_gives_the_layers_a_cache_of_the_dtype_asked(tiny_model):
    """The same window length over another cache dtype gets a new cache (not the last call's)."""
    from slimquant.evaluation import score_window
    from slimquant.layers.attention import KVCacheLayer
    from slimquant.models.loader import load_model

    lm = load_model(str(tiny_model("llama")), dtype="float32")
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        score_window(lm, torch.arange(5, 20), dtype)
        assert all(m.kv_cache.dtype == dtype for m in lm.model.modules() if isinstance(m, KVCacheLayer))
