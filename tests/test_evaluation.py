"""Perplexity windows and scores against transformers on a tiny model."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimquant.evaluation import evaluate, token_windows

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
