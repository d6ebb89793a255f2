"""Hypothesis fuzzes every endpoint of a live server: any body (valid fields with hostile values, wrong types, junk,
bytes that are not JSON) gets an answer below 500 on an intact connection, and the server answers a normal request
afterwards. Bounded by example count so CI stays fast."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimquant.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from tests.server.conftest import auth

# Example counts and seeding come from the Hypothesis profile (tests/conftest.py): "ci" by default, `pytest
# --hypothesis-profile hunt` for a long random search.
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))

INTS = st.sampled_from([0, 1, -1, 2, 7, 127, 128, 255, 49151, 49152, 2**31, -(2**31) - 1, 2**63, -(2**64), 10**30])
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 2.0, 2.0001]))
TEXTS = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "<|im_end|>", "\ud7ff" * 3, "a" * 300]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXTS)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXTS, inner, max_size=4), max_leaves=12
)
TOKEN_LISTS = st.lists(st.integers(0, 300), min_size=1, max_size=6) | st.lists(st.one_of(st.integers(0, 300), INTS))
CONTENT_PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "x", 5])},
    optional={"text": JSON, "image_url": JSON},
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), JSON)},
    optional={"content": st.one_of(TEXTS, st.lists(CONTENT_PART, max_size=3), JSON), "name": JSON},
)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
REGEXES = st.one_of(TEXTS, st.sampled_from(["(", "[a-", "a{99999}", "(a*)*b", "\\", "[^\\x00-\\x{10FFFF}]", "a{2,1}"]))
GRAMMARS = st.one_of(TEXTS, st.sampled_from(['root ::= "a"', "root ::= root", "root ::= ", 'a ::= "b"', "start: x"]))
SCHEMAS = st.one_of(
    JSON,
    st.sampled_from(
        [{"type": "object"}, {"$ref": "#/nope"}, {"type": "string", "pattern": "("}, {"enum": []}, {"minItems": -1}]
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["object", "array", "string", "integer", "x"])}, optional={
        "properties": st.dictionaries(TEXTS, JSON, max_size=2), "minimum": JSON, "maxLength": JSON}),
)  # fmt: skip
STRUCTURED = st.fixed_dictionaries(
    {},
    optional={"json": SCHEMAS, "regex": REGEXES, "choice": st.lists(TEXTS, max_size=3) | JSON, "grammar": GRAMMARS,
              "json_object": JSON, "structural_tag": TEXTS | SCHEMAS.map(json.dumps), "disable_any_whitespace": JSON},
)  # fmt: skip
RESPONSE_ITEM = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call", "input_text", 5])},
    optional={
        "role": st.one_of(st.sampled_from(["user", "assistant", "developer", "system"]), JSON),
        "content": st.one_of(TEXTS, st.lists(CONTENT_PART, max_size=2), JSON),
    },
)
TEXT_FORMAT = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema", "xml", 5])},
    optional={"schema": SCHEMAS, "name": TEXTS, "strict": JSON},
)
SPECIAL = {
    "input": st.one_of(TEXTS, st.lists(st.one_of(MESSAGE, RESPONSE_ITEM, JSON), max_size=3)),
    "text": st.fixed_dictionaries({"format": TEXT_FORMAT | JSON}) | JSON,
    "max_output_tokens": st.one_of(st.integers(-2, 8), INTS, JSON),
    "metadata": st.dictionaries(TEXTS, TEXTS, max_size=2) | JSON,
    "chat_template_kwargs": st.dictionaries(TEXTS, JSON, max_size=3) | JSON,
    "prompt": st.one_of(
        st.text(min_size=1, max_size=40),
        TEXTS,
        TOKEN_LISTS,
        st.lists(TEXTS, max_size=3),
        st.lists(TOKEN_LISTS, max_size=3),
    ),
    "tokens": TOKEN_LISTS,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3) | st.lists(st.one_of(MESSAGE, JSON), max_size=3),
    "logit_bias": st.dictionaries(st.one_of(TEXTS, INTS.map(str)), st.one_of(FLOATS, JSON), max_size=3),
    "stop": st.one_of(TEXTS, st.lists(TEXTS, max_size=3)),
    "stop_token_ids": TOKEN_LISTS,
    "max_tokens": st.one_of(st.integers(-2, 8), INTS, JSON),
    "max_completion_tokens": st.one_of(st.integers(-2, 8), INTS, JSON),
    "n": st.one_of(st.integers(-1, 6), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "tools": st.lists(
        st.one_of(st.just(TOOL), st.fixed_dictionaries({"type": TEXTS, "function": JSON}), JSON), max_size=2
    ),
    "structured_outputs": STRUCTURED | JSON,
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "structural_tag", "x"])},
        optional={"json_schema": st.fixed_dictionaries({}, optional={"name": TEXTS, "schema": SCHEMAS}) | JSON},
    )
    | JSON,
    "guided_json": SCHEMAS,
    "guided_regex": REGEXES,
    "guided_choice": st.lists(TEXTS, max_size=3),
    "guided_grammar": GRAMMARS,
    "tool_choice": st.one_of(
        st.sampled_from(["none", "auto", "required"]),
        st.just({"type": "function", "function": {"name": "f"}}),
        JSON,
    ),
}


def field_values(model, name: str) -> st.SearchStrategy:
    """Values for one request field: of its declared type (edge values included) most often, else anything."""
    typed = SPECIAL[name] if name in SPECIAL else st.from_type(model.model_fields[name].annotation)
    return st.one_of(typed, typed, typed, JSON)


def bodies(model, required: tuple[str, ...]) -> st.SearchStrategy:
    """Request bodies for a pydantic request model: the required fields (usually) and up to three others."""
    fields = {name: field_values(model, name) for name in model.model_fields}
    fields["an_unknown_field"] = JSON
    others = sorted(set(fields) - set(required))
    some = st.lists(st.sampled_from(others), max_size=3, unique=True)
    chosen = st.one_of(some.map(lambda ks: [*required, *ks]), some.map(lambda ks: [*required, *ks]), some)
    body = chosen.flatmap(lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))
    return st.one_of(body, body, body, JSON)


def raw_bytes() -> st.SearchStrategy:
    """Bodies that are not a JSON object: garbage, cut-off JSON, NaN literals, deep nesting."""
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"{", b'{"prompt": "a"', b"[]", b"null", b'{"prompt": NaN}', b"[" * 5000 + b"]" * 5000]),
    )


def encode(body) -> bytes:
    """JSON as Python writes it (NaN and Infinity included, as careless clients send them)."""
    return json.dumps(body, allow_nan=True).encode()


def assert_answered(r: httpx.Response) -> None:
    """Below 500; an error has OpenAI's error object; a stream ends with [DONE] or an error event."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and isinstance(err["message"], str), r.text
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        last = events[-1] if events else ""
        ended = last == "data: [DONE]" or last.startswith('data: {"type": "response.completed"')  # Responses API
        assert ended or '"error"' in last, r.text[-500:]
    else:
        r.json()


def send(server: str, path: str, content: bytes) -> int:
    """POST the bytes and check the answer; a dropped connection or a timeout raises and fails the example."""
    headers = {**auth(), "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{server}{path}", content=content, headers=headers)
    assert_answered(r)
    return r.status_code


ENDPOINTS = [
    ("/v1/completions", CompletionRequest, ("prompt",)),
    ("/v1/chat/completions", ChatCompletionRequest, ("messages",)),
    ("/tokenize", TokenizeRequest, ("prompt",)),
    ("/detokenize", DetokenizeRequest, ("tokens",)),
    ("/v1/responses", ResponsesRequest, ("input",)),
]


@pytest.mark.parametrize("path,model,required", ENDPOINTS, ids=[p for p, _, _ in ENDPOINTS])
def test_fuzzed_bodies_never_get_a_5xx_or_a_dropped_connection(server, path, model, required):
    statuses = set()

    @FUZZ
    @given(body=st.one_of(bodies(model, required).map(encode), raw_bytes()))
    def run(body: bytes) -> None:
        statuses.add(send(server, path, body))

    run()
    assert {200, 400} <= statuses, f"the fuzzer must reach both the engine and the validation: {statuses}"
    normal = {"prompt": "The capital of France is", "max_tokens": 4}
    r = httpx.post(f"{server}/v1/completions", json=normal, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
