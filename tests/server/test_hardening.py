"""Malformed and hostile requests get a 4xx with OpenAI's error object, never a 500 or a dropped connection, and one
large request does not stall the others."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL, auth, start_server, stop_server


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def post(server: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, headers=auth(), timeout=timeout)


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"prompt": "x", "logit_bias": {"99999999": 5}}, "logit_bias", "99999999"),
        ({"prompt": "x", "logit_bias": {"abc": 5}}, "logit_bias", "abc"),
        ({"prompt": [999999999]}, "prompt", "999999999"),
        ({"prompt": [-5, 3]}, "prompt", "-5"),
        ({"prompt": [[1, 2], [3, -1]]}, "prompt", "-1"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [[]]}, "prompt", "empty"),
        ({"prompt": "x", "seed": 2**80}, "seed", "seed"),
        ({"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids", "1000000000"),
        ({"prompt": "x", "top_k": -5}, "top_k", "top_k"),
        ({"prompt": "x", "min_p": 3}, "min_p", "min_p"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
        ({"prompt": "x", "logprobs": 99}, "logprobs", "logprobs"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop", "empty string"),
    ],
)
def test_bad_completion_fields_are_400s(server, body, param, words):
    err = error(post(server, "/v1/completions", body))
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_prompt_in_a_stream_or_a_batch_is_a_400_before_anything_runs(server, stream):
    body = {"prompt": [[5, 6], [7, 10**8]], "stream": stream, "max_tokens": 4}
    assert "100000000" in error(post(server, "/v1/completions", body))["message"]
    metrics = httpx.get(f"{server}/metrics").text.splitlines()
    running = [line for line in metrics if line.startswith("vllm:num_requests_running{")]
    assert running == ['vllm:num_requests_running{model_name="tiny"} 0.0']


def test_chat_content_parts_are_joined_as_vllm_does(server):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    as_parts = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "max_tokens": 4,
                                                     "temperature": 0})  # fmt: skip
    as_text = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Say\nhi"}],
                                                    "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]
    assert as_parts.json()["usage"] == as_text.json()["usage"]


@pytest.mark.parametrize(
    "content,words",
    [
        ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "image_url"),
        ([{"type": "text"}], "text"),
        ([{"text": "no type"}], "type"),
        ([17], "content"),
    ],
)
def test_chat_parts_the_model_cannot_take_are_400s(server, content, words):
    err = error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]}))
    assert words in err["message"], err


def test_tokenize_and_detokenize_validate(server):
    error(post(server, "/tokenize", {}))
    error(post(server, "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}))
    assert "-1" in error(post(server, "/detokenize", {"tokens": [-1]}))["message"]
    error(post(server, "/detokenize", {"tokens": "abc"}))
    parts = [{"type": "text", "text": "hi"}]
    assert post(server, "/tokenize", {"messages": [{"role": "user", "content": parts}]}).status_code == 200


def test_oversize_bodies_are_refused_at_once(server):
    start = time.perf_counter()
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "' + b"a" * (9 << 20) + b'"}',
                   headers={**auth(), "Content-Type": "application/json"}, timeout=60)  # fmt: skip
    assert error(r, 413)["code"] == "request_too_large"
    assert time.perf_counter() - start < 5

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * (1 << 20)

    r = httpx.post(f"{server}/v1/completions", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
    error(r, 413)


def test_a_large_request_does_not_stall_other_clients(tiny_model):
    """4 MB of prompts (each under the length that is refused untokenized) are tokenized off the event loop:
    /health answers meanwhile, and the request gets its 400."""
    proc, base = start_server(tiny_model("llama"))
    try:
        result = {}
        big = {"prompt": ["word " * 400] * 2000, "max_tokens": 1}
        worker = threading.Thread(target=lambda: result.setdefault("r", post(base, "/v1/completions", big, 120)))
        worker.start()
        time.sleep(0.3)  # the body is uploaded and being tokenized
        waits = []
        while worker.is_alive() and len(waits) < 50:
            start = time.perf_counter()
            assert httpx.get(f"{base}/health", timeout=30).status_code == 200
            waits.append(time.perf_counter() - start)
            time.sleep(0.05)
        worker.join()
        assert error(result["r"])["code"] == "context_length_exceeded"
        assert waits and max(waits) < 1.0, waits
    finally:
        stop_server(proc)


def test_a_text_longer_than_any_context_is_refused_untokenized(server):
    start = time.perf_counter()
    err = error(post(server, "/v1/completions", {"prompt": "word " * (1 << 20)}))
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    assert time.perf_counter() - start < 2


def test_unknown_fields_are_ignored(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "no_such_field": 1, "model": MODEL})
    assert r.status_code == 200, r.text


def test_slow_senders_do_not_hold_up_others(server):
    """Connections that trickle half a request (slowloris) leave /health and a completion unaffected."""
    host, port = server.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port))) for _ in range(16)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        start = time.perf_counter()
        assert httpx.get(f"{server}/health", timeout=10).status_code == 200
        r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and time.perf_counter() - start < 10, r.text
    finally:
        for s in slow:
            s.close()
