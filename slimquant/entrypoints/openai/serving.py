"""Completions and chat completions: request -> SamplingParams, engine outputs -> OpenAI bodies and SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from slimquant.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    SamplingFields,
    now,
    random_id,
    usage,
)
from slimquant.sampling_params import SamplingParams

_DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default; chat defaults to the room left in the context
_GEN_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServingContext:
    """What request handlers share: the async engine, tokenizer, names and limits."""

    engine: Any  # AsyncEngine
    tokenizer: Any
    model_name: str
    max_model_len: int
    max_n: int = 16
    chat_template: str | None = None
    generation_defaults: dict[str, float] = field(default_factory=dict)


def sampling_params(
    req: SamplingFields, ctx: ServingContext, prompt_len: int, logprobs: int | None, default_max: int | None
) -> SamplingParams:
    """Build SamplingParams from a request, with generation_config.json defaults for unset fields."""
    if req.n > ctx.max_n:
        raise OpenAIError(f"n={req.n} is larger than this server allows ({ctx.max_n})", param="n")
    room = ctx.max_model_len - prompt_len
    if room <= 0:
        raise OpenAIError(
            f"the prompt has {prompt_len} tokens but this model's context is {ctx.max_model_len} tokens;"
            " shorten the prompt",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max or room
    if max_tokens > room:
        raise OpenAIError(
            f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the context of "
            f"{ctx.max_model_len} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    values = {k: getattr(req, k) for k in _GEN_CONFIG_FIELDS}
    values = {k: (ctx.generation_defaults.get(k) if v is None else v) for k, v in values.items()}
    try:
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            stop=req.stop,
            seed=req.seed,
            logprobs=logprobs,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()} or None,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            stop_token_ids=req.stop_token_ids,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            **{k: v for k, v in values.items() if v is not None},
        )
    except ValueError as e:
        raise OpenAIError(str(e)) from e


def _check_model(req: SamplingFields, ctx: ServingContext) -> None:
    if req.model is not None and req.model != ctx.model_name:
        raise OpenAIError(
            f"the model '{req.model}' does not exist; this server serves '{ctx.model_name}'",
            status=404,
            param="model",
            code="model_not_found",
        )


def completion_prompts(req: CompletionRequest, ctx: ServingContext) -> list[list[int]]:
    """Token ids of each prompt in a completions request."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise OpenAIError("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in p):
        return [list(p)]
    return [list(x) if isinstance(x, list) else ctx.tokenizer(x).input_ids for x in p]


def chat_prompt(req: ChatCompletionRequest, ctx: ServingContext) -> list[int]:
    """Token ids of the conversation rendered with the chat template."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages,
            chat_template=req.chat_template or ctx.chat_template,
            add_generation_prompt=req.add_generation_prompt,
            tokenize=False,
        )
    except Exception as e:  # jinja errors, missing template
        raise OpenAIError(f"cannot apply the chat template: {e}", param="messages") from e
    return ctx.tokenizer(text, add_special_tokens=False).input_ids


async def _final(ctx: ServingContext, request_id: str, ids: list[int], params: SamplingParams):
    """Run one prompt to completion; returns its last RequestOutput."""
    final = None
    async for out in ctx.engine.generate(request_id, ids, params):
        final = out
    return final


async def create_completion(req: CompletionRequest, ctx: ServingContext) -> dict | AsyncIterator[str]:
    """POST /v1/completions."""
    _check_model(req, ctx)
    prompts = completion_prompts(req, ctx)
    params = [sampling_params(req, ctx, len(p), req.logprobs, _DEFAULT_MAX_TOKENS) for p in prompts]
    rid = random_id("cmpl")
    if req.stream:
        return _stream(ctx, rid, "text_completion", prompts, params, req)
    jobs = [_final(ctx, f"{rid}-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    choices, n_out = [], 0
    for i, out in enumerate(await asyncio.gather(*jobs)):
        for c in out.outputs:
            text = (out.prompt or ctx.tokenizer.decode(out.prompt_token_ids)) + c.text if req.echo else c.text
            choices.append(
                {
                    "index": i * req.n + c.index,
                    "text": text,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "logprobs": _completion_logprobs(c, ctx),
                }
            )
            n_out += len(c.token_ids)
    n_in = sum(len(p) for p in prompts)
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(n_in, n_out),
    }


async def create_chat(req: ChatCompletionRequest, ctx: ServingContext) -> dict | AsyncIterator[str]:
    """POST /v1/chat/completions."""
    _check_model(req, ctx)
    ids = chat_prompt(req, ctx)
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, ctx, len(ids), top, None)
    rid = random_id("chatcmpl")
    if req.stream:
        return _stream(ctx, rid, "chat.completion.chunk", [ids], [params], req)
    out = await _final(ctx, rid, ids, params)
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "logprobs": _chat_logprobs(c, ctx, top or 0) if req.logprobs else None,
        }
        for c in out.outputs
    ]
    n_out = sum(len(c.token_ids) for c in out.outputs)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(len(ids), n_out),
    }


async def _stream(ctx, rid, obj, prompts, params, req) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new text piece, a final usage chunk on request, then [DONE]."""
    chat = obj == "chat.completion.chunk"
    n_in = sum(len(p) for p in prompts)
    n_out = 0
    for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
        sent: dict[int, int] = {}
        async for out in ctx.engine.generate(f"{rid}-{i}", ids, sp):
            for c in out.outputs:
                index = i * req.n + c.index
                if chat and c.index not in sent:
                    yield _sse(_chunk(rid, obj, ctx, index, {"role": "assistant", "content": ""}, None, chat))
                delta = c.text[sent.get(c.index, 0) :]
                sent[c.index] = len(c.text)
                if delta or c.finish_reason:
                    body = {"content": delta} if chat else delta
                    yield _sse(_chunk(rid, obj, ctx, index, body, c.finish_reason, chat))
                if out.finished:
                    n_out += len(c.token_ids)
    if req.stream_options and req.stream_options.include_usage:
        yield _sse(
            {
                "id": rid,
                "object": obj,
                "created": now(),
                "model": ctx.model_name,
                "choices": [],
                "usage": usage(n_in, n_out),
            }
        )
    yield "data: [DONE]\n\n"


def _chunk(rid, obj, ctx, index, body, finish_reason, chat) -> dict:
    choice = {"index": index, "finish_reason": finish_reason}
    choice.update({"delta": body} if chat else {"text": body})
    return {"id": rid, "object": obj, "created": now(), "model": ctx.model_name, "choices": [choice]}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _completion_logprobs(c, ctx) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, token_lps, tops = [], [], []
    for tok, lps in zip(c.token_ids, c.logprobs, strict=True):
        tokens.append(_token_text(ctx, tok, lps))
        token_lps.append(lps[tok].logprob)
        tops.append({_token_text(ctx, t, lps): lp.logprob for t, lp in lps.items()})
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]  # into the completion text
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(c, ctx, k: int) -> dict:
    content = []
    for tok, lps in zip(c.token_ids, c.logprobs or [], strict=False):
        top = sorted(
            (kv for kv in lps.items() if kv[1].rank is not None and kv[1].rank <= k), key=lambda kv: kv[1].rank
        )
        content.append(
            {
                "token": _token_text(ctx, tok, lps),
                "logprob": lps[tok].logprob,
                "bytes": list(_token_text(ctx, tok, lps).encode()),
                "top_logprobs": [
                    {
                        "token": _token_text(ctx, t, lps),
                        "logprob": lp.logprob,
                        "bytes": list(_token_text(ctx, t, lps).encode()),
                    }
                    for t, lp in top
                ],
            }
        )
    return {"content": content}


def _token_text(ctx, token_id: int, lps: dict) -> str:
    lp = lps.get(token_id)
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return ctx.tokenizer.decode([token_id])
