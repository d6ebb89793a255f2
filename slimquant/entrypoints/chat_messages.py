"""A conversation -> the prompt its chat template writes, one way for LLM.chat, `slimquant chat` and the server (as
vLLM's chat_utils): OpenAI's content parts joined into one text, as vLLM does for text-only models, and tool calls'
arguments as the objects chat templates expect."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from slimquant.errors import ParamError

# apply_chat_template's own arguments, which chat_template_kwargs may not set
_ARGUMENTS = frozenset(
    {"conversation", "messages", "chat_template", "add_generation_prompt", "continue_final_message", "tools",
     "tokenize", "return_dict", "return_tensors", "padding", "truncation", "max_length", "documents"}
)  # fmt: skip


def normalized(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each message as chat templates take it; ParamError naming a message whose content is not text."""
    return [_with_call_objects(_joined(message, i)) for i, message in enumerate(messages)]


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The conversation (messages as normalized() gives them) as the tokenizer's template (or chat_template) writes
    it; chat_template_kwargs are the template's own variables (e.g. Qwen3's enable_thinking), ParamError where one
    would override an argument here."""
    if taken := sorted(set(chat_template_kwargs or {}) & _ARGUMENTS):
        raise ParamError("chat_template_kwargs", f"chat_template_kwargs may not set {taken}: give them as themselves")
    if continue_final_message and add_generation_prompt:
        raise ParamError(
            "continue_final_message",
            "continue_final_message and add_generation_prompt cannot both be true: the answer either goes on with "
            "the last message or starts a new one",
        )
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=tools or None,
        tokenize=False,
        **(chat_template_kwargs or {}),
    )


def prompt(tokenizer: Any, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """An engine prompt of the conversation: render(...)'s text and its token ids (the template wrote the special
    tokens)."""
    text = render(tokenizer, normalized(messages), **options)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def _joined(message: dict[str, Any], i: int) -> dict[str, Any]:
    """message with its content parts (OpenAI's [{"type": "text", "text": ...}]) joined into one text."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    where, texts = f"messages[{i}].content", []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None:
            raise ParamError(where, f"{where}: every part needs a 'type'")
        if kind != "text":
            raise ParamError(where, f"{where}: part type {kind!r} is not supported: this model takes text only")
        if not isinstance(part.get("text"), str):
            raise ParamError(where, f"{where}: a text part needs a 'text' string")
        texts.append(part["text"])
    return message | {"content": "\n".join(texts)}


def _with_call_objects(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool calls with their arguments as objects (OpenAI clients send JSON strings)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    fixed = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            with contextlib.suppress(ValueError):  # not JSON: the template gets the text
                function["arguments"] = json.loads(function["arguments"])
        fixed.append({**call, "function": function})
    return message | {"tool_calls": fixed}
