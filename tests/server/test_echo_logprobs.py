"""Scoring through /v1/completions as lm-evaluation-harness does (echo=true, logprobs=1, max_tokens 0 or 1): one
entry per prompt token (the first null) with the model's log p(token | tokens before), equal to transformers'
within 1e-4, text offsets into the echoed text, then the completion's; vLLM's prompt_logprobs field; batched
prompts and streaming (echo, and each chunk's logprobs adding up to the whole) too."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.server.conftest import MODEL, auth

PROMPTS = ["The quick brown fox jumps over the lazy dog", "0 1 2 3 4 5"]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """prompt -> (token ids, transformers' logprob of each token after the first)."""
    path = tiny_model("llama")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()  # [L, V]
        lps = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out[prompt] = (ids, lps.tolist())
    return out


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_every_prompt_token_as_transformers(client, reference, max_tokens):
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0
    )
    assert r.usage.completion_tokens == max_tokens * len(PROMPTS)
    for prompt, c in zip(PROMPTS, sorted(r.choices, key=lambda c: c.index), strict=True):
        ids, want = reference[prompt]
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = lp.token_logprobs[1 : len(ids)]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
        assert c.text.startswith(prompt) and "".join(lp.tokens) == c.text
        assert lp.text_offset == [0, *itertools.accumulate(len(t) for t in lp.tokens[:-1])]
        if max_tokens == 0:
            assert c.text == prompt and c.finish_reason == "length"
        for i in range(1, len(lp.tokens)):  # the token itself and the top one are in the top logprobs
            assert lp.tokens[i] in lp.top_logprobs[i] and max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i]


def test_vllm_prompt_logprobs_field(client, reference):
    prompt = PROMPTS[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    scored = r.choices[0].model_extra["prompt_logprobs"]
    ids, want = reference[prompt]
    assert scored[0] is None and len(scored) == len(ids)
    for tok, entry, lp in zip(ids[1:], scored[1:], want, strict=True):
        assert abs(entry[str(tok)]["logprob"] - lp) < 1e-4 and 1 <= len(entry) <= 3
        assert sorted(e["rank"] for e in entry.values())[0] == 1


def test_streamed_echo_starts_with_the_prompt(server):
    body = {"model": MODEL, "prompt": PROMPTS[1], "echo": True, "max_tokens": 3}
    text = "".join(c["text"] for c in _stream(server, "/v1/completions", body))
    assert text.startswith(PROMPTS[1]) and len(text) > len(PROMPTS[1])


@pytest.mark.parametrize(
    "body,words",
    [({"max_tokens": 0}, "max_tokens=0 returns nothing without echo"), ({"max_tokens": -1}, "max_tokens")],
)
def test_max_tokens_zero_needs_echo(server, body, words):
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hi", **body}, headers=auth())
    assert r.status_code == 400 and words in r.text


def test_chat_max_tokens_zero_is_a_400(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth())
    assert r.status_code == 400 and "at least 1" in r.text


def _stream(server: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}{path}", json={**body, "stream": True}, headers=auth(), timeout=60) as r:
        return [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]


def test_streamed_completion_logprobs_add_up_to_the_whole(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "logprobs": 2, "echo": True, "temperature": 0}
    whole = httpx.post(f"{server}/v1/completions", json=body, headers=auth(), timeout=60).json()["choices"][0]
    parts = [c["logprobs"] for c in _stream(server, "/v1/completions", body) if c.get("logprobs")]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == whole["logprobs"][key], key


def test_streamed_chat_logprobs_add_up_to_the_whole(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "logprobs": True,
            "top_logprobs": 2, "temperature": 0}  # fmt: skip
    whole = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60).json()["choices"][0]
    parts = [c["logprobs"]["content"] for c in _stream(server, "/v1/chat/completions", body) if c.get("logprobs")]
    assert [x for p in parts for x in p] == whole["logprobs"]["content"] and len(whole["logprobs"]["content"]) == 6


def test_chat_logprobs_are_the_models(server, tiny_model):
    """Chat's logprobs and top_logprobs of each generated token equal transformers' log-softmax after the rendered
    conversation and the tokens before it (within 1e-4), the top ones in order."""
    path = tiny_model("llama")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    messages = [{"role": "user", "content": "Name three colours."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "ignore_eos": True}  # fmt: skip
    got = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60).json()
    content = got["choices"][0]["logprobs"]["content"]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    assert got["usage"]["prompt_tokens"] == len(ids) and len(content) == 5
    for entry in content:
        with torch.no_grad():
            lps = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        top = lps.topk(3)
        token = int(top.indices[0])  # greedy
        assert entry["token"] == tok.decode([token]) and abs(entry["logprob"] - lps[token].item()) < 1e-4
        tops = zip(entry["top_logprobs"], top.values.tolist(), strict=True)
        assert all(abs(t["logprob"] - v) < 1e-4 for t, v in tops)
        assert all(t["logprob"] >= u["logprob"] for t, u in itertools.pairwise(entry["top_logprobs"]))
        ids.append(token)
