"""Sample and prompt logprobs equal log_softmax of transformers' logits at those positions."""

from __future__ import annotations

import math

import pytest
import torch

from slimquant import SamplingParams
from tests.engine.reference import hf_logprobs

PROMPT = "The quick brown fox jumps"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sample_logprobs_match_transformers(llm, hf_model, tokenizer, temperature):
    params = SamplingParams(temperature=temperature, max_tokens=5, logprobs=3, seed=3, ignore_eos=True)
    c = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    ids = tokenizer.encode(PROMPT)
    ref = hf_logprobs(hf_model, ids + c.token_ids)[len(ids) - 1 : -1]  # [5, V] row i predicts output token i
    assert len(c.logprobs) == 5
    for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        assert next(iter(entry)) == token  # the sampled token comes first
        top3 = ref[i].topk(3).indices.tolist()
        assert set(top3) <= set(entry) and len(entry) in (3, 4)
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[i, t]), abs=1e-4)
            assert lp.rank == int((ref[i] > ref[i, t]).sum()) + 1
            assert lp.decoded_token == tokenizer.decode([t])
    expected = sum(float(ref[i, t]) for i, t in enumerate(c.token_ids))
    assert c.cumulative_logprob == pytest.approx(expected, abs=1e-3)


def test_no_logprobs_unless_asked(llm):
    c = llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert c.outputs[0].logprobs is None and c.outputs[0].cumulative_logprob is None and c.prompt_logprobs is None


def test_prompt_logprobs_match_transformers(llm, hf_model, tokenizer):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = tokenizer.encode(PROMPT)
    ref = hf_logprobs(hf_model, ids)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for j in range(1, len(ids)):
        entry = out.prompt_logprobs[j]
        assert next(iter(entry)) == ids[j]
        assert entry[ids[j]].logprob == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        assert set(ref[j - 1].topk(2).indices.tolist()) <= set(entry)


def test_prompt_logprobs_with_chunked_prefill(llama_path, hf_model, tokenizer):
    from slimquant import LLM

    llm = LLM(str(llama_path), max_model_len=64, num_kv_blocks=16, max_num_batched_tokens=4, max_num_seqs=2)
    prompt = "It is a truth universally acknowledged, that a single man"
    ids = tokenizer.encode(prompt)
    assert len(ids) > 8
    out = llm.generate(prompt, SamplingParams(max_tokens=3, prompt_logprobs=0, temperature=0), use_tqdm=False)[0]
    ref = hf_logprobs(hf_model, ids)
    got = [e[ids[j]].logprob for j, e in enumerate(out.prompt_logprobs) if j]
    assert got == pytest.approx([float(ref[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])


def test_full_vocab_logprobs(llm):
    c = llm.generate(PROMPT, SamplingParams(max_tokens=1, logprobs=-1), use_tqdm=False)[0].outputs[0]
    probs = torch.tensor([lp.logprob for lp in c.logprobs[0].values()]).exp()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-4)
