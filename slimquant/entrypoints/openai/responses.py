"""POST /v1/responses (OpenAI's Responses API, which vLLM serves too), for text: the request becomes a chat
completion (serving.create_chat: one path for generating), and its answer or stream becomes a response object or the
Responses API's events. Nothing is stored: previous_response_id is refused, and the whole conversation goes in
`input`."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from slimquant.entrypoints.openai import serving
from slimquant.entrypoints.openai.protocol import ChatCompletionRequest, OpenAIError, ResponsesRequest, now, random_id

log = logging.getLogger(__name__)
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text")


async def create_response(req: ResponsesRequest, ctx: serving.ServingContext) -> dict | AsyncIterator[str]:
    """The response object, or (stream) its server-sent events."""
    chat = await serving.create_chat(_as_chat(req), ctx)
    shell = _Shell(req, ctx.model_name)
    if isinstance(chat, dict):
        choice = chat["choices"][0]
        text, status = choice["message"]["content"] or "", _status(choice["finish_reason"])
        return shell.response(status, [shell.message(text, status)], chat["usage"])
    return _events(shell, chat)


def _as_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that generates req's answer; OpenAIError for what slimquant's responses do not take."""
    if req.model_extra:
        log.warning("the request's fields %s are not supported and were ignored", sorted(req.model_extra))
    if req.tools:
        raise OpenAIError("tools are not supported on /v1/responses: use /v1/chat/completions", param="tools")
    if req.tool_choice not in (None, "none", "auto"):  # a call it asks for could not come without tools
        raise OpenAIError(
            f"tool_choice {req.tool_choice!r} asks for a tool call, and /v1/responses takes no tools: use "
            "/v1/chat/completions",
            param="tool_choice",
        )
    if req.previous_response_id is not None:
        raise OpenAIError(
            "previous_response_id is not supported: slimquant stores no responses; send the conversation in input",
            param="previous_response_id",
        )
    if req.background:
        raise OpenAIError("background responses are not supported", param="background")
    try:
        return ChatCompletionRequest(
            model=req.model,
            messages=_messages(req),
            max_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            user=req.user,
            response_format=_response_format(req.text),
            stream=req.stream,
            stream_options={"include_usage": True} if req.stream else None,
        )
    except ValidationError as e:  # a message the chat request cannot hold
        raise OpenAIError(f"input: {e.errors()[0]['msg']}", param="input") from None


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """instructions (as a system message) and input, as chat messages."""
    out = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return [*out, {"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if (kind := item.get("type", "message")) != "message":
            raise OpenAIError(f"{where}: item type {kind!r} is not supported: only messages", param=where)
        if not isinstance(item.get("role"), str) or item["role"] not in _ROLES:
            raise OpenAIError(f"{where}: role must be one of {sorted(_ROLES)}, got {item.get('role')!r}", param=where)
        out.append({"role": _ROLES[item["role"]], "content": _content(item.get("content"), where)})
    if not out:
        raise OpenAIError("input holds no message", param="input")
    return out


def _content(content: Any, where: str) -> str | list[dict[str, str]]:
    """A message's content as chat content: a text, or its text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(f"{where}: content must be a string or a list of parts", param=where)
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise OpenAIError(f"{where}: part type {kind!r} is not supported: this model takes text only", param=where)
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format as chat's response_format (None: plain text)."""
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        fields = ("name", "schema", "strict", "description")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in fields if k in fmt}}
    raise OpenAIError(f"text.format type must be text, json_object or json_schema, got {kind!r}", param="text")


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class _Shell:
    """What every response object and event of one request shares: its ids, time and settings."""

    def __init__(self, req: ResponsesRequest, model_name: str):
        self.req, self.model_name = req, model_name
        self.id, self.message_id, self.created = random_id("resp", "_"), random_id("msg", "_"), now()

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The output message item (status: in_progress, completed, or incomplete where max_output_tokens cut it)."""
        content = [_text_part(text)] if status != "in_progress" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def response(self, status: str, output: list[dict], used: dict | None) -> dict[str, Any]:
        """The response object."""
        req = self.req
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model_name,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "store": False,
            "temperature": req.temperature,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": None if used is None else _usage(used),
            "user": req.user,
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(used: dict[str, int]) -> dict[str, Any]:
    """Chat's usage object as the Responses API's."""
    return {
        "input_tokens": used["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": used["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": used["total_tokens"],
    }


async def _events(shell: _Shell, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """The Responses API's server-sent events for one message, from chat's stream chunks (the last of which holds
    the usage)."""
    numbers = itertools.count()

    def event(kind: str, **body: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(numbers), **body})}\n\n"

    yield event("response.created", response=shell.response("in_progress", [], None))
    yield event("response.in_progress", response=shell.response("in_progress", [], None))
    yield event("response.output_item.added", output_index=0, item=shell.message("", "in_progress"))
    where = {"item_id": shell.message_id, "output_index": 0, "content_index": 0}
    yield event("response.content_part.added", **where, part=_text_part(""))
    text, finish, used = "", None, None
    async for data in chunks:
        if not data["choices"]:  # the usage chunk
            used = data["usage"]
            continue
        choice = data["choices"][0]
        if delta := choice["delta"].get("content"):
            text += delta
            yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
        finish = choice["finish_reason"] or finish
    status = _status(finish)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=_text_part(text))
    message = shell.message(text, status)
    yield event("response.output_item.done", output_index=0, item=message)
    # response.completed even where max_output_tokens cut it (its status says so), as vLLM does: what the openai
    # client's stream helpers wait for
    yield event("response.completed", response=shell.response(status, [message], used))
