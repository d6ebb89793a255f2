"""Completions and chat completions: request -> SamplingParams, engine outputs -> OpenAI bodies and SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from slimquant.engine.inputs import truncated
from slimquant.entrypoints import chat_messages
from slimquant.entrypoints.openai.async_engine import interleaved
from slimquant.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    SamplingFields,
    TokenizeRequest,
    now,
    random_id,
    usage,
)
from slimquant.entrypoints.openai.structured import structured_outputs
from slimquant.entrypoints.openai.tool_calls import ParsedTools, ToolMode, tool_mode
from slimquant.errors import ParamError
from slimquant.sampling_params import SamplingParams, StructuredOutputsParams

log = logging.getLogger(__name__)
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
    tool_parser: str | None = None  # --tool-call-parser with --enable-auto-tool-choice: "auto" tool choice parses
    # one thread tokenizes, off the event loop (and one call at a time: the tokenizer is not thread-safe)
    tokenizer_thread: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "slimquant-tokenize"))

    async def run_tokenizer(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the tokenizer thread, awaited."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, call)

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters past which a text cannot fit the context: max_model_len times the longest token's text
        (a token never covers more characters than its own text has)."""
        longest = max(len(t or "") for t in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer)))))
        return self.max_model_len * max(longest, 1)

    def check_text_length(self, text: str, param: str) -> None:
        """OpenAIError at once for a text too long to fit the context whatever its tokens (no tokenizing)."""
        if len(text) > self.max_prompt_chars:
            raise OpenAIError(
                f"the {param} has {len(text)} characters, more than any {self.max_model_len}-token context can hold",
                param=param,
                code="context_length_exceeded",
            )


def sampling_params(
    req: SamplingFields,
    ctx: ServingContext,
    prompt_len: int,
    logprobs: int | None,
    default_max: int | None,
    structured: StructuredOutputsParams | None = None,
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
            logit_bias=_logit_bias(req.logit_bias),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            stop_token_ids=req.stop_token_ids,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words,
            include_stop_str_in_output=req.include_stop_str_in_output,
            structured_outputs=structured,
            **{k: v for k, v in values.items() if v is not None},
        )
    except ParamError as e:
        raise OpenAIError(str(e), param=e.param) from e
    except ValueError as e:
        raise OpenAIError(str(e)) from e


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token id as a string -> bias); ParamError naming a key that is not a token id."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise ParamError("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
    return out or None


def _check_model(req: SamplingFields, ctx: ServingContext) -> None:
    if req.model_extra:
        log.warning("the request's fields %s are not supported and were ignored", sorted(req.model_extra))
    if req.model is not None and req.model != ctx.model_name:
        raise OpenAIError(
            f"the model '{req.model}' does not exist; this server serves '{ctx.model_name}'",
            status=404,
            param="model",
            code="model_not_found",
        )


async def completion_prompts(req: CompletionRequest, ctx: ServingContext) -> list[list[int]]:
    """Token ids of each prompt in a completions request (texts tokenized off the event loop)."""
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise OpenAIError("the prompt is empty", param="prompt")
    if all(isinstance(t, int) for t in p):
        p = [list(p)]
    out = []
    for x in p:
        if isinstance(x, str):
            ctx.check_text_length(x, "prompt")
            x = (await ctx.run_tokenizer(ctx.tokenizer, x)).input_ids
        if not x:
            raise OpenAIError("the prompt is empty (0 tokens)", param="prompt")
        out.append(_truncated(list(x), req, ctx))
    return out


def _truncated(ids: list[int], req: SamplingFields, ctx: ServingContext) -> list[int]:
    """ids cut to their last req.truncate_prompt_tokens (-1: the model's context), as vLLM does."""
    if (keep := req.truncate_prompt_tokens) is None:
        return ids
    if not (keep == -1 or 1 <= keep <= ctx.max_model_len):
        raise OpenAIError(
            f"truncate_prompt_tokens must be from 1 to the model's context of {ctx.max_model_len} tokens, or -1 (the "
            f"context), got {req.truncate_prompt_tokens}",
            param="truncate_prompt_tokens",
        )
    return truncated(ids, keep, ctx.max_model_len)


async def chat_prompt(req: ChatCompletionRequest | TokenizeRequest, ctx: ServingContext) -> list[int]:
    """Token ids of the conversation rendered with the chat template (off the event loop)."""
    try:
        messages = chat_messages.normalized([m.model_dump(exclude_none=True) for m in req.messages])
    except ParamError as e:
        raise OpenAIError(str(e), param=e.param) from None
    for i, m in enumerate(messages):
        if isinstance(m.get("content"), str):
            ctx.check_text_length(m["content"], f"messages[{i}].content")
    text = await ctx.run_tokenizer(_render_chat, ctx, messages, req)
    ctx.check_text_length(text, "messages")
    return (await ctx.run_tokenizer(ctx.tokenizer, text, add_special_tokens=False)).input_ids


def _render_chat(ctx: ServingContext, messages: list[dict], req: ChatCompletionRequest | TokenizeRequest) -> str:
    try:
        return chat_messages.render(
            ctx.tokenizer,
            messages,
            chat_template=req.chat_template or ctx.chat_template,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=getattr(req, "tools", None),
            chat_template_kwargs=req.chat_template_kwargs,
        )
    except ParamError as e:
        raise OpenAIError(str(e), param=e.param) from None
    except Exception as e:  # jinja errors, missing template
        raise OpenAIError(f"cannot apply the chat template: {e}", param="messages") from e


async def _compile(ctx: ServingContext, structured: StructuredOutputsParams | None) -> None:
    """A structured output compiled on the tokenizer thread (which xgrammar's first use reads the vocabulary on),
    not on the event loop; OpenAIError with the reason when it does not compile."""
    if structured is not None:
        try:
            await ctx.run_tokenizer(ctx.engine.compile_grammar, structured)
        except ParamError as e:
            raise OpenAIError(str(e), param=e.param) from e


def _start(ctx: ServingContext, rid: str, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    """Queue every prompt now, or none: a bad one aborts those already queued and becomes a 400."""
    streams = []
    try:
        for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            streams.append(ctx.engine.add(f"{rid}-{i}", ids, sp))
    except ValueError as e:
        for stream in streams:
            ctx.engine.abort(stream.request_id)
        raise OpenAIError(str(e), param=getattr(e, "param", None)) from e
    return streams


async def create_completion(req: CompletionRequest, ctx: ServingContext) -> dict | AsyncIterator[dict]:
    """POST /v1/completions. echo returns the prompt before the completion, with its tokens' logprobs (the first
    null) where logprobs are asked for, as OpenAI's legacy API and vLLM do; max_tokens 0 with echo scores the
    prompt only."""
    _check_model(req, ctx)
    if req.max_tokens == 0 and not req.echo:
        raise OpenAIError("max_tokens=0 returns nothing without echo=true (scoring the prompt)", param="max_tokens")
    prompts = await completion_prompts(req, ctx)
    generate = req.model_copy(update={"max_tokens": 1}) if req.max_tokens == 0 else req  # its token is dropped
    structured = structured_outputs(req)
    params = [sampling_params(generate, ctx, len(p), req.logprobs, _DEFAULT_MAX_TOKENS, structured) for p in prompts]
    await _compile(ctx, structured)
    if (scored := _prompt_logprobs_wanted(req)) is not None:
        params = [dataclasses.replace(p, prompt_logprobs=scored) for p in params]
    rid = random_id("cmpl")
    streams = _start(ctx, rid, prompts, params)
    if req.stream:
        return _stream(ctx, rid, "text_completion", streams, prompts, req)
    choices, n_out = [], 0
    for i, out in enumerate(await asyncio.gather(*(s.final() for s in streams))):
        for c in out.outputs:
            choices.append(_completion_choice(out, c, i * req.n + c.index, req, ctx))
            n_out += 0 if req.max_tokens == 0 else len(c.token_ids)
    n_in = sum(len(p) for p in prompts)
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(n_in, n_out),
    }


async def create_chat(req: ChatCompletionRequest, ctx: ServingContext) -> dict | AsyncIterator[dict]:
    """POST /v1/chat/completions: the response, or (stream) its chunks."""
    _check_model(req, ctx)
    if req.max_tokens == 0:
        raise OpenAIError("max_tokens must be at least 1 (scoring a prompt is for completions)", param="max_tokens")
    tools = tool_mode(req.tools, req.tool_choice, ctx.tool_parser, req.parallel_tool_calls)
    structured = structured_outputs(req, tools.structured if tools else None)
    ids = _truncated(await chat_prompt(req, ctx), req, ctx)
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, ctx, len(ids), top, None, structured)
    await _compile(ctx, structured)
    rid = random_id("chatcmpl")
    streams = _start(ctx, rid, [ids], [params])
    if req.stream:
        return _stream(ctx, rid, "chat.completion.chunk", streams, [ids], req, tools)
    out = await streams[0].final()
    choices = []
    for c in out.outputs:
        parsed = tools.parse(c.text) if tools else ParsedTools(c.text)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.calls:
            message["tool_calls"] = parsed.calls
        choices.append(
            {
                "index": c.index,
                "message": message,
                "finish_reason": tools.finish_reason(parsed, c.finish_reason) if tools else c.finish_reason,
                "stop_reason": c.stop_reason,
                "logprobs": _chat_logprobs(c.token_ids, c.logprobs or [], ctx, top or 0) if req.logprobs else None,
            }
        )
    n_out = sum(len(c.token_ids) for c in out.outputs)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(len(ids), n_out),
    }


async def _stream(ctx, rid, obj, streams, prompts, req, tools: ToolMode | None = None) -> AsyncIterator[dict]:
    """The stream's chunks: one per new text piece, then a usage chunk on request. Requests not yet streamed are
    aborted if the client goes away."""
    chat = obj == "chat.completion.chunk"
    try:
        async for chunk in _stream_chunks(ctx, rid, obj, streams, req, chat, tools):
            yield chunk
    finally:
        for stream in streams:
            ctx.engine.abort(stream.request_id)  # no-op for the finished ones
    if req.stream_options and req.stream_options.include_usage:
        n_in = sum(len(p) for p in prompts)
        n_out = sum(len(c.token_ids) for stream in streams if stream.last for c in stream.last.outputs)
        yield {
            "id": rid,
            "object": obj,
            "created": now(),
            "model": ctx.model_name,
            "choices": [],
            "usage": usage(n_in, n_out),
        }


async def _stream_chunks(ctx, rid, obj, streams, req, chat, tools: ToolMode | None = None) -> AsyncIterator[dict]:
    """The requests' chunks as their outputs come (several prompts' interleave), each with the logprobs of the
    tokens it adds where they are asked for; with tools, text that may be calls (from a <tool_call> on; all of a
    forced call) is held back and sent as tool_calls when the choice ends."""
    echo, scoring = not chat and req.echo, not chat and req.max_tokens == 0
    top = (req.top_logprobs or 0) if chat else None
    continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats
    sent: dict[int, tuple[int, int, int]] = {}  # choice -> (characters, tokens, next token's text offset)
    async for i, out in interleaved(streams):
        for c in out.outputs:
            index = i * req.n + c.index
            first = index not in sent
            chars, tokens, offset = sent.get(index, (0, 0, 0))
            n_in = len(out.prompt_token_ids)
            if chat and first:
                chunk = _chunk(rid, obj, ctx, index, {"role": "assistant", "content": ""}, None, chat)
                yield chunk | ({"usage": usage(n_in, 0)} if continuous else {})
            text, ids, lps = ("", [], []) if scoring else (c.text, list(c.token_ids), c.logprobs)
            calls, finish = [], c.finish_reason
            if tools and c.finish_reason is None:
                text = tools.visible(text)
            elif tools:  # the end: calls, or what was held back is content after all
                parsed = tools.parse(text)
                calls, text = parsed.calls, (parsed.content or "") if parsed.calls else text
                finish = tools.finish_reason(parsed, c.finish_reason)
            delta, new_ids, new_lps = text[chars:], ids[tokens:], None if lps is None else lps[tokens:]
            if echo and first:  # the prompt comes first, as in the non-streamed text
                delta = _prompt_text(out, ctx) + delta
                if new_lps is not None:
                    new_ids, new_lps = list(out.prompt_token_ids) + new_ids, list(out.prompt_logprobs) + new_lps
            if calls:  # the held-back calls, whole
                body = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                yield _chunk(rid, obj, ctx, index, body, None, chat)
            if delta or c.finish_reason or new_ids:
                chunk = _chunk(rid, obj, ctx, index, {"content": delta} if chat else delta, finish, chat)
                if new_lps is not None and chat:
                    chunk["choices"][0]["logprobs"] = _chat_logprobs(new_ids, new_lps, ctx, top)
                elif new_lps is not None:  # offsets go on from the tokens sent, as in the whole response
                    chunk["choices"][0]["logprobs"] = lp = _completion_logprobs(new_ids, new_lps, ctx, offset)
                    offset += sum(len(t) for t in lp["tokens"])
                if continuous:  # this choice's tokens so far, as vLLM counts them
                    chunk["usage"] = usage(n_in, 0 if scoring else len(ids))
                yield chunk
            sent[index] = (len(text), len(ids), offset)


def _chunk(rid, obj, ctx, index, body, finish_reason, chat) -> dict:
    choice = {"index": index, "finish_reason": finish_reason}
    choice.update({"delta": body} if chat else {"text": body})
    return {"id": rid, "object": obj, "created": now(), "model": ctx.model_name, "choices": [choice]}


def _prompt_logprobs_wanted(req: CompletionRequest) -> int | None:
    """How many top logprobs each prompt token needs: echo's logprobs, vLLM's prompt_logprobs field; None: none."""
    wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    return max(wanted) if wanted else None


def _completion_choice(out, c, index: int, req: CompletionRequest, ctx) -> dict:
    """One choice of a completion response: the echoed prompt (its tokens' logprobs first) and the completion."""
    token_ids, logprobs, text = list(c.token_ids), c.logprobs, c.text
    if req.max_tokens == 0:  # scoring only: the one generated token is not part of the answer
        token_ids, logprobs, text = [], [] if logprobs is not None else None, ""
    if req.echo:
        text = _prompt_text(out, ctx) + text
        if logprobs is not None:
            token_ids, logprobs = list(out.prompt_token_ids) + token_ids, list(out.prompt_logprobs) + logprobs
    choice = {
        "index": index,
        "text": text,
        "finish_reason": "length" if req.max_tokens == 0 else c.finish_reason,
        "stop_reason": None if req.max_tokens == 0 else c.stop_reason,
        "logprobs": None if logprobs is None else _completion_logprobs(token_ids, logprobs, ctx),
    }
    if req.prompt_logprobs is not None:
        choice["prompt_logprobs"] = [None if lps is None else _by_token_id(lps) for lps in out.prompt_logprobs]
    return choice


def _prompt_text(out, ctx) -> str:
    """A request's prompt as text (decoded where it came as token ids): what echo puts first."""
    return out.prompt or ctx.tokenizer.decode(out.prompt_token_ids)


def _completion_logprobs(token_ids: list[int], logprobs: list[dict | None], ctx, start: int = 0) -> dict:
    """OpenAI's legacy logprobs of tokens (an entry of None: a first prompt token, scored by nothing): each
    token's text, logprob, top logprobs by text, and offset into the choice's text (the first at start)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, lps in zip(token_ids, logprobs, strict=True):
        offsets.append(offsets[-1] + len(tokens[-1]) if tokens else start)
        tokens.append(ctx.tokenizer.decode([tok]) if lps is None else _token_text(ctx, tok, lps))
        token_lps.append(None if lps is None else _finite(lps[tok].logprob))
        tops.append(None if lps is None else {_token_text(ctx, t, lps): _finite(lp.logprob) for t, lp in lps.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _by_token_id(lps: dict) -> dict:
    """vLLM's prompt_logprobs entry: token id -> its logprob, rank and text."""
    return {
        str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for t, lp in lps.items()
    }


def _finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf (a masked token) as vLLM's -9999.0."""
    return max(logprob, -9999.0)


def _chat_logprobs(token_ids: list[int], logprobs: list[dict], ctx, k: int) -> dict:
    """Chat's logprobs of tokens: each token's text, logprob, bytes and its k most likely alternatives."""
    content = []
    for tok, lps in zip(token_ids, logprobs, strict=True):
        top = sorted(
            (kv for kv in lps.items() if kv[1].rank is not None and kv[1].rank <= k), key=lambda kv: kv[1].rank
        )
        content.append(
            {
                "token": _token_text(ctx, tok, lps),
                "logprob": _finite(lps[tok].logprob),
                "bytes": list(_token_text(ctx, tok, lps).encode()),
                "top_logprobs": [
                    {
                        "token": _token_text(ctx, t, lps),
                        "logprob": _finite(lp.logprob),
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
