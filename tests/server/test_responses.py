"""POST /v1/responses through the official openai client: the same answer as chat completions (it is one), in the
Responses API's objects and events; what it cannot do is a 400 naming the field."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL
from tests.server.conftest import auth as _auth

GREEDY = dict(model=MODEL, max_output_tokens=8, temperature=0)


def _chat(client, messages: list[dict], max_tokens: int = 8):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)


def test_a_response_is_the_chat_completions_answer(client):
    r = client.responses.create(input="Tell me a story", instructions="Be brief", **GREEDY)
    chat = _chat(client, [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Tell me a story"}])
    assert r.output_text == chat.choices[0].message.content and r.id.startswith("resp_")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    done = chat.choices[0].finish_reason == "stop"
    assert r.status == ("completed" if done else "incomplete") and r.output[0].status == r.status
    assert done or r.incomplete_details.reason == "max_output_tokens"


def test_tool_choice_none_is_taken_and_echoed(client):
    """tool_choice "none" asks for no tool call, which a response without tools honours (as "auto" does)."""
    r = client.responses.create(input="Tell me a story", tool_choice="none", **GREEDY)
    plain = client.responses.create(input="Tell me a story", **GREEDY)
    assert r.tool_choice == "none" and plain.tool_choice == "auto" and r.output_text == plain.output_text


def test_input_items_and_content_parts_are_chat_messages(client):
    items = [
        {"role": "developer", "content": "Answer in French"},  # OpenAI's name for a system message
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Bonjour"}]},
        {"role": "user", "content": "And goodbye?"},
    ]
    r = client.responses.create(input=items, **GREEDY)
    chat = _chat(
        client,
        [
            {"role": "system", "content": "Answer in French"},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "And goodbye?"},
        ],
    )
    assert r.output_text == chat.choices[0].message.content


def test_a_streamed_response_has_the_events_and_text_of_the_whole_one(client):
    whole = client.responses.create(input="Once upon a time", **GREEDY)
    events = list(client.responses.create(input="Once upon a time", stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",  # also where its status is incomplete, as vLLM sends it
    ]
    assert events[-1].response.status == whole.status
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    with client.responses.stream(input="Once upon a time", **GREEDY) as stream:  # the SDK's own accumulator
        assert stream.get_final_response().output_text == whole.output_text


SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
}


NAMED = {"name": "a", "schema": SCHEMA}


@pytest.mark.parametrize(
    "fmt,chat_format",
    [
        ({"type": "json_schema", **NAMED}, {"type": "json_schema", "json_schema": NAMED}),
        ({"type": "json_object"}, {"type": "json_object"}),
    ],
)
def test_a_text_format_constrains_as_chats_response_format(client, fmt, chat_format):
    """The same constraint as chat's (the openai client's responses.parse runs on SmolLM2 in test_structured.py)."""
    r = client.responses.create(input="Where?", text={"format": fmt}, **GREEDY)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Where?"}], max_tokens=8, temperature=0,
        response_format=chat_format,
    )  # fmt: skip
    plain = client.responses.create(input="Where?", **GREEDY)
    assert r.output_text == chat.choices[0].message.content != plain.output_text


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools", "use /v1/chat/completions"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice", "takes no tools"),
        ({"input": "x", "tool_choice": {"type": "function", "name": "f"}}, "tool_choice", "takes no tools"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0]", "text"),
        ({"input": [{"type": "function_call_output", "output": "1"}]}, "input[0]", "only messages"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0]", "role must be one of"),
        ({"input": [{"role": ["user"]}]}, "input[0]", "role must be one of"),  # was a 500 (the fuzzer's find)
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text", "json_schema"),
        ({"input": []}, "input", "no message"),
        ({"input": "x", "model": "nope"}, "model", "does not exist"),
    ],
)
def test_what_responses_cannot_do_is_a_400_naming_the_field(server, body, param, words):
    r = httpx.post(f"{server}/v1/responses", json=body, headers=_auth(), timeout=30)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
