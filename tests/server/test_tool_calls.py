"""Tool calls on chat completions as vLLM serves them: the hermes parser (Qwen's <tool_call> JSON blocks), vLLM's
tool_choice rules (auto needs --enable-auto-tool-choice --tool-call-parser; required / named become structured
outputs), tools and tool-call messages reaching the chat template, and the parsed calls in the response, whole and
streamed (checked on a stub engine that writes a call). Forced calls on a model: tests/server/test_structured.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from slimquant.entrypoints.openai import serving
from slimquant.entrypoints.openai.protocol import ChatCompletionRequest, OpenAIError
from slimquant.entrypoints.openai.tool_calls import content_before_calls, parse_hermes, tool_mode
from slimquant.outputs import CompletionOutput, RequestOutput
from tests.server.conftest import MODEL, auth, start_server, stop_server

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}  # fmt: skip
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_hermes_parser():
    parsed = parse_hermes("Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert parsed.content == "Let me look."
    assert [json.loads(c["function"]["arguments"]) for c in parsed.calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in parsed.calls)
    assert parse_hermes(CALL).content is None
    assert parse_hermes("no calls").calls == [] and parse_hermes("no calls").content == "no calls"
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_hermes(broken).calls == [] and parse_hermes(broken).content == broken  # as vLLM: text stays text
    assert parse_hermes('<tool_call>{"name": "f", "arguments": {}}').calls  # cut off by max_tokens: still a call


def test_content_held_back_from_a_possible_call():
    assert content_before_calls("Hello <tool") == "Hello "
    assert content_before_calls("Hello <tool_call>{") == "Hello "
    assert content_before_calls("a < b") == "a < b"


@pytest.mark.parametrize(
    "tools,choice,parser,words",
    [
        ([WEATHER], "auto", None, '"auto" tool choice requires --enable-auto-tool-choice'),
        ([WEATHER], None, None, '"auto" tool choice requires'),  # tools and no choice: auto, as vLLM
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, None, "one of the tools' names"),
        ([WEATHER], {"type": "function"}, None, "one of the tools' names"),
        (None, "auto", "hermes", "needs 'tools'"),
        ([{"type": "function"}], "auto", "hermes", r"tools\[0\] must be"),
        ([WEATHER], "sometimes", "hermes", "is not 'none'"),
    ],
)
def test_tool_choice_rules(tools, choice, parser, words):
    with pytest.raises(OpenAIError, match=words):
        tool_mode(tools, choice, parser)


def test_the_mode_follows_the_choice():
    assert (
        tool_mode([WEATHER], "auto", "hermes").kind == "auto"
        and tool_mode([WEATHER], "auto", "hermes").structured is None
    )
    assert tool_mode([WEATHER], "none", None) is None and tool_mode(None, None, None) is None
    named = tool_mode([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)  # no flags needed
    assert named.kind == "named" and named.structured.json == WEATHER["function"]["parameters"]
    required = tool_mode([WEATHER], "required", None, parallel=False).structured.json
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert required["items"]["anyOf"][0]["properties"]["name"]["enum"] == ["get_weather"]


def test_forced_answers_parse_as_calls():
    named = tool_mode([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None)
    parsed = named.parse('{"city": "Oslo"}')
    assert parsed.content is None and parsed.calls[0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Oslo"}',
    }
    assert named.finish_reason(parsed, "stop") == "stop"  # as OpenAI for a named function
    required = tool_mode([WEATHER], "required", None)
    parsed = required.parse('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    assert json.loads(parsed.calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert required.finish_reason(parsed, "stop") == "tool_calls"
    assert required.parse('[{"name": "get_wea').calls == []  # cut short by max_tokens: content, no calls
    assert required.visible("[{") == "" and named.visible("{") == ""  # a forced answer streams only as calls


class _Stream:
    """A finished request whose text arrives in pieces."""

    def __init__(self, pieces: list[str]):
        self.pieces, self.last, self.request_id = pieces, None, "r"

    async def outputs(self):
        text = ""
        for k, piece in enumerate(self.pieces):
            text += piece
            done = "stop" if k == len(self.pieces) - 1 else None
            completion = CompletionOutput(0, text, [2] * (k + 1), None, None, done)
            self.last = RequestOutput("r", "p", [1], None, [completion], done is not None)
            yield self.last

    async def final(self):
        async for _ in self.outputs():
            pass
        return self.last


class _Engine:
    def __init__(self, pieces):
        self.pieces = pieces

    def add(self, rid, ids, params):
        return _Stream(self.pieces)

    def abort(self, rid):
        pass


class _Tokenizer:
    def apply_chat_template(self, messages, tools=None, **kw):
        self.seen = (messages, tools)
        return "prompt"

    def __call__(self, text, **kw):
        return type("Enc", (), {"input_ids": [1, 2, 3]})()

    def convert_ids_to_tokens(self, ids):
        return ["x"] * len(ids)

    def __len__(self):
        return 10


def _ctx(pieces):
    return serving.ServingContext(
        engine=_Engine(pieces), tokenizer=_Tokenizer(), model_name=MODEL, max_model_len=128, tool_parser="hermes"
    )


PIECES = ["Let me ", "look. <tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>']


def _request(**kw) -> ChatCompletionRequest:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
    ]  # fmt: skip
    return ChatCompletionRequest(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto", **kw)


def test_response_carries_the_calls_and_the_template_gets_tools_and_call_arguments():
    ctx = _ctx(PIECES)
    body = asyncio.run(serving.create_chat(_request(), ctx))
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    messages, tools = ctx.tokenizer.seen
    assert tools == [WEATHER] and messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_streamed_calls_come_whole_after_the_content():
    async def collect():
        return [chunk async for chunk in await serving.create_chat(_request(stream=True), _ctx(PIECES))]

    choices = [e["choices"][0] for e in asyncio.run(collect())]
    content = "".join(c["delta"].get("content") or "" for c in choices)
    calls = [t for c in choices for t in c["delta"].get("tool_calls", [])]
    assert content == "Let me look. " and "<tool" not in content
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_a_held_back_tag_that_is_not_a_call_is_sent_at_the_end():
    async def collect():
        return [chunk async for chunk in await serving.create_chat(_request(stream=True), _ctx(["a <to", "y"]))]

    choices = [e["choices"][0] for e in asyncio.run(collect())]
    assert "".join(c["delta"].get("content") or "" for c in choices) == "a <toy"
    assert choices[-1]["finish_reason"] == "stop"


def test_server_flags():
    """Without the flags, an auto tool request is a 400 naming them; --enable-auto-tool-choice alone is refused."""
    from slimquant.entrypoints.cli import main

    assert main(["serve", "SmolLM2-135M-Instruct", "--enable-auto-tool-choice"]) == 1


def test_tools_without_the_flags_is_a_400(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER]}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=30)
    assert r.status_code == 400 and "--enable-auto-tool-choice" in r.text


def test_server_with_the_flags_answers_tool_requests(tiny_model):
    proc, base = start_server(tiny_model("llama"), "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER], "max_tokens": 4}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth(), timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop", "tool_calls")
    finally:
        stop_server(proc)
