"""The sampler against plain formulas: penalties, bias, masks, top-k/top-p/min-p, greedy, seeded draws, logprobs."""

from __future__ import annotations

import pytest
import torch

from slimquant.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    top_k_top_p_candidates,
    top_logprobs,
)

V = 8


def batch(n: int = 1, **overrides) -> SamplingBatch:
    """n rows of neutral settings (temperature 1, no filters), with `overrides` as per-row lists."""
    floats = dict(temperature=1.0, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0)
    floats["repetition_penalty"] = 1.0
    fields = {k: torch.tensor(overrides.pop(k, [v] * n), dtype=torch.float32) for k, v in floats.items()}
    fields["top_k"] = torch.tensor(overrides.pop("top_k", [0] * n), dtype=torch.int64)
    lists = dict(prompt_ids=[[]] * n, output_ids=[[]] * n, logit_bias=[None] * n, allowed_ids=[None] * n)
    lists.update(banned_ids=[[]] * n, grammars=[None] * n, generators=[None] * n, num_logprobs=[None] * n)
    return SamplingBatch(**fields, **{**lists, **overrides})


def test_penalties_follow_the_vllm_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0, 0.2]])
    b = batch(
        repetition_penalty=[1.5],
        frequency_penalty=[0.3],
        presence_penalty=[0.7],
        prompt_ids=[[0, 1]],
        output_ids=[[3, 3, 4]],
    )
    expected = logits.clone()
    for t in (0, 1, 3, 4):  # repetition: prompt and output tokens
        expected[0, t] = expected[0, t] / 1.5 if expected[0, t] > 0 else expected[0, t] * 1.5
    for t, count in ((3, 2), (4, 1)):  # frequency and presence: output tokens only
        expected[0, t] -= 0.3 * count + 0.7
    assert torch.allclose(apply_penalties(logits.clone(), b), expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    sampler = Sampler(torch.Generator().manual_seed(0))
    greedy = dict(temperature=[0.0], output_ids=[[0]])
    assert sampler(logits, batch(**greedy)).token_ids == [0]
    assert sampler(logits, batch(**greedy, presence_penalty=[0.5])).token_ids == [1]
    assert sampler(logits, batch(**greedy, repetition_penalty=[1.1])).token_ids == [1]


def test_bias_allowed_and_banned_tokens():
    logits = torch.zeros(3, V)
    logits[:, 0] = 10.0
    b = batch(3, temperature=[0.0] * 3, logit_bias=[{5: 20.0}, None, None])
    b.allowed_ids, b.banned_ids = [None, [2, 6], None], [[], [], [0]]
    tokens = Sampler(torch.Generator())(logits, b).token_ids
    assert tokens[0] == 5 and tokens[1] in (2, 6) and tokens[2] != 0


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0]]) + 1e-9)
    kept = lambda out: (out > float("-inf")).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))) == [0, 1]
    assert kept(apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.65]))) == [0, 1]
    assert kept(apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.75]))) == [0, 1, 2]
    assert kept(apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.01]))) == [0]
    assert kept(apply_min_p(logits, torch.tensor([0.4]))) == [0, 1, 2]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    logits = torch.log(probs + 1e-12).expand(4000, V)
    tokens = torch.tensor(Sampler(torch.Generator().manual_seed(0))(logits, batch(4000)).token_ids)
    freq = torch.bincount(tokens, minlength=V).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0, 0, 0, 0, 0, 0, 0]]).expand(2000, V)
    sampler = Sampler(torch.Generator().manual_seed(0))
    hot = sum(t == 0 for t in sampler(logits, batch(2000, temperature=[2.0] * 2000)).token_ids)
    cold = sum(t == 0 for t in sampler(logits, batch(2000, temperature=[0.2] * 2000)).token_ids)
    assert cold > 1900 and hot < 600


def test_seeded_rows_are_reproducible_whatever_the_batch():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))

    def draw(row_logits, shared_seed):
        b = batch(len(row_logits), generators=[torch.Generator().manual_seed(42)] + [None] * (len(row_logits) - 1))
        return Sampler(torch.Generator().manual_seed(shared_seed))(row_logits, b).token_ids[0]

    draws = {draw(logits[:1], 0) for _ in range(3)} | {draw(logits, s) for s in range(3)}
    assert len(draws) == 1


def test_logprobs_ranks_and_top_k():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    lp = torch.log_softmax(logits, -1)
    [entries] = top_logprobs(lp, torch.tensor([3]), [2])
    assert [(t, r) for t, _, r in entries] == [(3, 4), (0, 1), (2, 2)]
    assert entries[0][1] == pytest.approx(float(lp[0, 3]))
    [entries] = top_logprobs(lp, torch.tensor([0]), [2])
    assert [(t, r) for t, _, r in entries] == [(0, 1), (2, 2)]
    assert top_logprobs(lp, torch.tensor([0]), [None]) == [None]


def test_plain_greedy_rows_take_the_argmax_shortcut_only_when_nothing_else_applies():
    from types import SimpleNamespace

    from slimquant.engine.step_sampler import plain_greedy
    from slimquant.sampling_params import SamplingParams

    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    full = Sampler(torch.Generator())(logits, batch(3, temperature=[0.0] * 3))
    assert Sampler.argmax(logits).token_ids == full.token_ids

    def seq(grammar=None, **params) -> SimpleNamespace:  # what plain_greedy reads of a Sequence
        return SimpleNamespace(params=SamplingParams(**params), num_output_tokens=0, grammar=grammar)

    assert plain_greedy(seq(temperature=0))
    assert not plain_greedy(seq(grammar=object(), temperature=0))  # a structured output's mask applies
    for params in (
        dict(temperature=0.5),
        dict(temperature=0, logprobs=0),
        dict(temperature=0, repetition_penalty=1.2),
        dict(temperature=0, logit_bias={3: 1.0}),
        dict(temperature=0, allowed_token_ids=[3]),
        dict(temperature=0, min_tokens=2),  # EOS is banned until 2 tokens are out
    ):
        assert not plain_greedy(seq(**params)), params


@pytest.mark.parametrize("seed", range(4))
def test_candidates_keep_the_tokens_the_sorting_masks_keep(seed):
    """top_k_top_p_candidates (topk, widened until every nucleus fits) keeps apply_top_k_top_p's token set."""
    g = torch.Generator().manual_seed(seed)
    vocab = 3000
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([[0.5], [1.0], [2.0], [4.0], [1.0], [0.3]])
    top_k = torch.tensor([0, 40, 0, 2500, 7, 0])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.3, 0.999])  # the last row's nucleus needs most of the vocabulary
    want = apply_top_k_top_p(logits, top_k, top_p) > float("-inf")  # [N, V]
    ids, kept = top_k_top_p_candidates(logits, top_k, top_p, width=16)
    got = torch.zeros_like(want).scatter_(1, ids, kept > float("-inf"))
    assert torch.equal(got, want)
    assert top_k_top_p_candidates(logits, torch.zeros(6, dtype=torch.int64), torch.ones(6))[0] is None


def test_sampler_leaves_the_logits_alone():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    before = logits.clone()
    b = batch(2, temperature=[0.7, 0.0], top_p=[0.8, 1.0], logit_bias=[{1: 5.0}, None])
    b.banned_ids = [[2], []]
    Sampler(torch.Generator().manual_seed(0))(logits, b)
    assert torch.equal(logits, before)
