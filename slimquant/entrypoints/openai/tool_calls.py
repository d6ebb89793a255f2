"""Tool calls on chat completions, as vLLM serves them: which tool_choice a request may use, the tools handed to the
chat template, and the hermes parser (`--tool-call-parser hermes`: Qwen2.5 / Qwen3's
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) that turns the model's text into OpenAI tool_calls."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from slimquant.entrypoints.openai.protocol import OpenAIError
from slimquant.sampling_params import StructuredOutputsParams

PARSERS = ("hermes",)
START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)  # a last call may be cut off by max_tokens


@dataclass
class ParsedTools:
    """The text a model wrote, split into its content (None: only calls) and its tool calls (OpenAI's entries)."""

    content: str | None
    calls: list[dict] = field(default_factory=list)


def parse_hermes(text: str) -> ParsedTools:
    """Each <tool_call> block as a call and the text before the first as content; text whose blocks are not all
    JSON objects with a "name" stays content, with no calls (as vLLM's parser does)."""
    blocks = _CALL.findall(text)
    if not blocks:
        return ParsedTools(text)
    try:
        calls = [_call(json.loads(b)) for b in blocks]
    except (ValueError, KeyError, TypeError):
        return ParsedTools(text)
    return ParsedTools(text[: text.find(START)].strip() or None, calls)


def _call(obj: dict) -> dict:
    args = obj.get("arguments", {})
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
    }


def content_before_calls(text: str) -> str:
    """The part of a growing text that is surely content: up to the first <tool_call>, less a tail that could be
    its start (what a stream may send before the model is done)."""
    cut = text.find(START)
    if cut >= 0:
        return text[:cut]
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-n:]):
            return text[:-n]
    return text


@dataclass
class ToolMode:
    """How a chat answer becomes tool calls: "auto" (the parser finds calls in the text), "named" (the whole answer
    is one function's arguments) or "required" (the whole answer is a JSON list of calls); the forced kinds come
    with the structured output that makes the model write them."""

    kind: str
    function: str | None = None  # the named function
    structured: StructuredOutputsParams | None = None

    def parse(self, text: str) -> ParsedTools:
        """The answer's content and calls."""
        if self.kind == "auto":
            return parse_hermes(text)
        if self.kind == "named":
            return ParsedTools(None, [_call({"name": self.function, "arguments": text})])
        try:  # required: [{"name": ..., "parameters": {...}}, ...]; cut short (max_tokens) it stays content
            calls = [_call({"name": c["name"], "arguments": c["parameters"]}) for c in json.loads(text)]
        except (ValueError, KeyError, TypeError):
            return ParsedTools(text)
        return ParsedTools(None, calls)

    def visible(self, text: str) -> str:
        """The part of a growing answer a stream may send as content before it ends."""
        return content_before_calls(text) if self.kind == "auto" else ""

    def finish_reason(self, parsed: ParsedTools, reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" where the model chose to call, the sampler's reason for a named call."""
        return "tool_calls" if parsed.calls and self.kind != "named" else reason


def tool_mode(tools: list[dict] | None, tool_choice: Any, parser: str | None, parallel: bool = True) -> ToolMode | None:
    """How a chat request's answer goes through tools (None: it does not); OpenAIError for a choice this server
    cannot honour (vLLM's rules: "auto" needs --enable-auto-tool-choice and --tool-call-parser)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise OpenAIError("tool_choice needs 'tools' to choose from", param="tool_choice")
        return None
    _check_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if choice == "auto":
        if parser is None:
            raise OpenAIError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                param="tool_choice",
            )
        return ToolMode("auto")
    if choice == "required":
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(t["function"]) for t in tools]}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolMode("required", structured=StructuredOutputsParams(json=schema))
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        function = next((t["function"] for t in tools if t["function"]["name"] == name), None)
        if function is None:
            raise OpenAIError(
                f"tool_choice {choice!r} must be {{'type': 'function', 'function': {{'name': N}}}} with N one of "
                f"the tools' names {[t['function']['name'] for t in tools]}",
                param="tool_choice",
            )
        return ToolMode("named", name, StructuredOutputsParams(json=_parameters(function)))
    raise OpenAIError(f"tool_choice {choice!r} is not 'none', 'auto', 'required' or a function", param="tool_choice")


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _call_schema(function: dict) -> dict:
    """A JSON schema of one call of the function, as "required" asks for it: {"name": ..., "parameters": ...}."""
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [function["name"]]}, "parameters": _parameters(function)},
        "required": ["name", "parameters"],
    }


def _check_tools(tools: list[dict]) -> None:
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if not named or tool.get("type") != "function":
            raise OpenAIError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                param=f"tools[{i}]",
            )
