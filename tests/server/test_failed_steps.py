"""A request whose engine step fails gets OpenAI's error object with a 500 (not a bare 'Internal Server Error'),
streamed or not; a failed step fails its requests only, and a rank's failure stops the engine (in-process app)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from slimquant import LLM
from slimquant.entrypoints.openai.server import make_server_app
from slimquant.errors import RankFailure


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), max_model_len=64)


def _app(llm: LLM, fatal: list) -> tuple[TestClient, object]:
    app, engine = make_server_app(llm, "tiny", on_fatal=fatal.append)
    return TestClient(app, raise_server_exceptions=False), engine


def _fail_next_step(llm: LLM, error: Exception, monkeypatch) -> None:
    step = llm.llm_engine.step

    def fails_once():
        monkeypatch.setattr(llm.llm_engine, "step", step)
        raise error

    monkeypatch.setattr(llm.llm_engine, "step", fails_once)


def _error(r) -> dict:
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "internal_error"
    return err


def test_a_failed_step_is_a_500_with_the_error_object_and_the_server_goes_on(llm, monkeypatch):
    fatal: list = []
    client, engine = _app(llm, fatal)
    try:
        _fail_next_step(llm, RuntimeError("boom in a step"), monkeypatch)
        err = _error(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}))
        assert err["message"] == "RuntimeError: boom in a step"
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200
        assert not fatal
    finally:
        engine.shutdown()


@pytest.mark.parametrize("stream", [False, True])
def test_a_rank_failure_is_the_error_object_and_stops_the_engine(llm, monkeypatch, stream):
    fatal: list = []
    client, engine = _app(llm, fatal)
    failure = RankFailure("tensor parallel: rank(s) [1] of 2 failed (rank 1 exited with code -9)")
    try:
        _fail_next_step(llm, failure, monkeypatch)
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": stream})
        if stream:
            event = json.loads(r.text.split("data: ", 1)[1].split("\n", 1)[0])
            err = event["error"]
            assert err["type"] == "internal_error", event
        else:
            err = _error(r)
        assert err["message"] == f"RankFailure: {failure}"
        assert fatal == [failure]
    finally:
        engine.shutdown()
