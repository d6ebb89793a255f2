"""The real server on a loopback port, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import slimquant
from tests.server.conftest import MODEL
from tests.server.conftest import auth as _auth


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_usage_and_greedy_determinism(client):
    a = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=8, temperature=0)
    b = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens == 8 and a.choices[0].finish_reason == "length"
    tokens = httpx.post(f"{client.base_url}".replace("/v1/", "") + "/tokenize", json={"prompt": "Hello, my name is"})
    assert a.usage.prompt_tokens == tokens.json()["count"]
    assert a.usage.total_tokens == a.usage.prompt_tokens + 8


def test_completion_n_and_logprobs(client):
    r = client.completions.create(
        model=MODEL, prompt="The capital", max_tokens=4, n=3, temperature=1.0, seed=1, logprobs=2
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.tokens) == 4 and len(c.logprobs.token_logprobs) == 4
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(c.logprobs.text_offset)
    assert r.usage.completion_tokens == 12


def test_chat_and_seed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0.9, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.role == "assistant"
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 6


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy picks the top token


def test_streaming_completion_matches_non_streaming(client):
    full = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0)
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_continuous_usage_stats_count_each_choices_tokens_so_far(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the prompt's tokens and its choice's
    completion tokens so far; the last one of a choice has them all."""
    kw = dict(model=MODEL, max_tokens=6, temperature=1.0, stream=True, extra_body={"ignore_eos": True})
    options = {"include_usage": True, "continuous_usage_stats": True}
    prompt = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=1).usage.prompt_tokens
    chunks = list(client.completions.create(prompt="Once upon", n=2, seed=3, stream_options=options, **kw))
    by_choice: dict[int, list[int]] = {}
    for c in chunks[:-1]:
        assert c.usage.prompt_tokens == prompt and c.usage.total_tokens == prompt + c.usage.completion_tokens
        by_choice.setdefault(c.choices[0].index, []).append(c.usage.completion_tokens)
    assert sorted(by_choice) == [0, 1]
    for counts in by_choice.values():
        assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert chunks[-1].usage.completion_tokens == 12  # include_usage's total, as before
    chat = dict(messages=[{"role": "user", "content": "Tell me"}], stream_options=options, **kw)
    counts = [c.usage.completion_tokens for c in client.chat.completions.create(**chat) if c.choices]
    assert counts[0] == 0 and counts[-1] == 6 and counts == sorted(counts)  # the role chunk first


def test_allowed_token_ids_limit_what_is_generated(server):
    """vLLM's allowed_token_ids (was ignored): every generated token is one of them; ids outside the vocabulary
    are a 400 naming the field."""
    body = {"prompt": "Once upon", "max_tokens": 12, "temperature": 1.0, "seed": 5, "ignore_eos": True, "logprobs": 0}
    allowed = [5, 17, 42]
    r = httpx.post(f"{server}/v1/completions", json=body | {"allowed_token_ids": allowed}, headers=_auth(), timeout=60)
    text = r.json()["choices"][0]["text"]
    pieces = [httpx.post(f"{server}/detokenize", json={"tokens": [t]}).json()["prompt"] for t in allowed]
    assert re.fullmatch(f"(?:{'|'.join(map(re.escape, pieces))}){{12}}", text), (text, pieces)
    bad = httpx.post(f"{server}/v1/completions", json=body | {"allowed_token_ids": [10**9]}, headers=_auth())
    assert bad.status_code == 400 and "allowed_token_ids" in bad.json()["error"]["message"], bad.text


def test_bad_words_reach_the_sampler(server):
    """vLLM's bad_words (the engine's tests check what they ban): a token of the greedy answer, once banned, is
    not generated, and the answer is the same before it."""

    def tokens(body: dict) -> list[str]:
        r = httpx.post(f"{server}/v1/completions", json=body, headers=_auth(), timeout=60)
        return r.json()["choices"][0]["logprobs"]["tokens"]

    body = {"prompt": "Once upon", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    plain = tokens(body)
    ids = [httpx.post(f"{server}/tokenize", json={"prompt": t, "add_special_tokens": False}).json() for t in plain]
    k = next(i for i, t in enumerate(plain) if t.strip() and ids[i]["count"] == 1 and not t.startswith(" "))
    got = tokens(body | {"bad_words": [plain[k]]})
    assert got[:k] == plain[:k] and plain[k] not in got, (plain, got)


def test_a_stream_of_several_prompts_interleaves_them(server):
    """As vLLM's: each prompt's chunks come as the engine makes them (the second prompt's first ones do not wait
    for the first prompt's end), and each prompt's text is its own completion's."""
    body = {"prompt": ["Once upon", "The capital of France"], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = httpx.post(f"{server}/v1/completions", json=body, headers=_auth(), timeout=60).json()["choices"]
    with httpx.stream("POST", f"{server}/v1/completions", json=body | {"stream": True}, headers=_auth()) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    order = [c["choices"][0]["index"] for c in chunks]
    assert order.index(1) < max(k for k, i in enumerate(order) if i == 0), order
    for choice in full:
        got = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == choice["index"])
        assert got == choice["text"]


def test_streaming_chat(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_stream_ends_with_done(server):
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=_auth(), timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_health_metrics_tokenize(server, client):
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/ping").status_code == 200 and httpx.post(f"{server}/ping").status_code == 200
    assert httpx.get(f"{server}/version").json() == {"version": slimquant.__version__}
    before = _metrics(server)
    r = client.completions.create(model=MODEL, prompt="count me", max_tokens=2, extra_body={"ignore_eos": True})
    after = _metrics(server)
    # vLLM's names and model_name label, so its dashboards read them
    for name, grew in (
        ("vllm:prompt_tokens_total", r.usage.prompt_tokens),
        ("vllm:generation_tokens_total", 2),
        ("vllm:time_to_first_token_seconds_count", 1),
        ("vllm:time_per_output_token_seconds_count", 1),
        ('vllm:request_success_total{finished_reason="length"}', 1),
    ):
        assert after[name] - before.get(name, 0.0) == grew, name
    assert after["vllm:num_requests_running"] == after["vllm:kv_cache_usage_perc"] == 0.0
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello"


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "x", "model": "nope"}, 404, "model"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "n": 99}, 400, "n"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "word " * 400}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
        ({"prompt": "x", "bad_words": "word"}, 400, "bad_words"),
        ({"prompt": "x", "bad_words": ["ok", " "]}, 400, "bad_words"),
        ({"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
        ({"prompt": "x", "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
        ({"prompt": "x", "truncate_prompt_tokens": 129}, 400, "truncate_prompt_tokens"),  # over the context of 128
    ],
)
def test_bad_completion_requests(server, body, status, param):
    err = _error(httpx.post(f"{server}/v1/completions", json=body, headers=_auth(), timeout=30), status)
    assert err["param"] == param


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server):
    """vLLM's truncate_prompt_tokens: the answer is the one to the prompt's last k tokens alone; -1 keeps the
    model's context (128 here)."""

    def post(path: str, body: dict, status: int = 200) -> dict:
        r = httpx.post(f"{server}{path}", json=body, headers=_auth(), timeout=60)
        assert r.status_code == status, r.text
        return r.json()

    text = "The quick brown fox jumps over the lazy dog"
    ids = post("/tokenize", {"prompt": text})["tokens"]
    greedy = {"max_tokens": 6, "temperature": 0, "logprobs": 2}
    want = post("/v1/completions", {"prompt": ids[-4:], **greedy})["choices"][0]
    for prompt in (ids, text):
        got = post("/v1/completions", {"prompt": prompt, "truncate_prompt_tokens": 4, **greedy})
        assert got["usage"]["prompt_tokens"] == 4 and got["choices"][0] == want
    chat = {"messages": [{"role": "user", "content": text}], "max_tokens": 2, "truncate_prompt_tokens": 3}
    assert post("/v1/chat/completions", chat)["usage"]["prompt_tokens"] == 3
    err = post("/v1/completions", {"prompt": ids * 20, "truncate_prompt_tokens": -1}, status=400)["error"]
    assert err["message"].startswith("the prompt has 128 tokens but this model's context is 128 tokens"), err


def test_chat_template_kwargs_and_continue_final_message(server):
    """vLLM's chat fields: the template's own variables (Qwen3's enable_thinking is one) reach it, and an answer
    may go on with the last message."""

    def post(path: str, body: dict, status: int = 200) -> dict:
        r = httpx.post(f"{server}{path}", json=body, headers=_auth(), timeout=60)
        assert r.status_code == status, r.text
        return r.json()

    messages = [{"role": "user", "content": "hello"}]
    template = "{{ flavour }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    body = {"messages": messages, "chat_template": template, "chat_template_kwargs": {"flavour": "mint: "}}
    ids = post("/tokenize", body)["tokens"]
    assert post("/detokenize", {"tokens": ids})["prompt"] == "mint: hello"
    chat = {"messages": [*messages, {"role": "assistant", "content": "Hi"}], "max_tokens": 2}
    going_on = post("/v1/chat/completions", chat | {"continue_final_message": True, "add_generation_prompt": False})
    assert going_on["usage"]["prompt_tokens"] < post("/v1/chat/completions", chat)["usage"]["prompt_tokens"]
    err = post("/v1/chat/completions", chat | {"continue_final_message": True}, 400)["error"]
    assert err["param"] == "continue_final_message" and "cannot both be true" in err["message"], err
    err = post("/v1/chat/completions", chat | {"chat_template_kwargs": {"tokenize": True}}, 400)["error"]
    assert err["param"] == "chat_template_kwargs" and "['tokenize']" in err["message"], err


def test_malformed_json_and_missing_messages(server):
    r = httpx.post(
        f"{server}/v1/chat/completions", content=b"{not json", headers={**_auth(), "Content-Type": "application/json"}
    )
    err = _error(r, 400)
    assert err["message"].startswith("the request body is not valid JSON (") and "at character 1)" in err["message"]
    assert err["param"] is None
    _error(httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL}, headers=_auth()), 400)
    _error(httpx.post(f"{server}/v1/chat/completions", json={"messages": []}, headers=_auth()), 400)


def test_auth_required_on_v1(server):
    assert _error(httpx.get(f"{server}/v1/models"), 401)["type"] == "authentication_error"
    _error(httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{server}/v1/models", headers=_auth()).status_code == 200


def _metrics(server) -> dict[str, float]:
    """The server's samples of model MODEL by name (with their labels but model_name, if any)."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text):
        for sample in family.samples:
            if sample.labels.pop("model_name", MODEL) == MODEL:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def _aborted(server) -> float:
    return _metrics(server).get('vllm:request_success_total{finished_reason="abort"}', 0.0)


@pytest.mark.parametrize("prompts", [["Go on"], ["Go on", "And on"]], ids=["one-prompt", "two-prompts"])
def test_disconnect_cancels_and_frees_blocks(server, client, prompts):
    before = _aborted(server)
    body = {"prompt": prompts, "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=_auth(), timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    for _ in range(50):
        metrics = _metrics(server)
        if metrics["vllm:num_requests_running"] == 0 and metrics["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the cancelled request still holds the batch or KV blocks:\n" + metrics)
    assert _aborted(server) == before + len(prompts)
    # the server keeps serving
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens == 2


def test_error_body_is_json(server):
    r = httpx.post(f"{server}/detokenize", json={"tokens": [10**9]})
    assert json.loads(r.text)["error"]["param"] == "tokens"
