"""The OpenAI-compatible HTTP server (FastAPI): routes, auth, errors, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from slimquant import __version__
from slimquant.entrypoints.openai import responses, serving
from slimquant.entrypoints.openai.async_engine import AsyncEngine
from slimquant.entrypoints.openai.metrics import ServerMetrics
from slimquant.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    ResponsesRequest,
    TokenizeRequest,
    now,
)
from slimquant.errors import RankFailure

log = logging.getLogger(__name__)


DEFAULT_MAX_REQUEST_BYTES = 8 << 20  # a request body past this is refused with 413, unread


def build_app(
    ctx: serving.ServingContext,
    api_key: str | None = None,
    metrics: ServerMetrics | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The app serving ctx's engine; every /v1 route needs `Authorization: Bearer api_key` when one is set; bodies
    over max_request_bytes are refused. When the server shuts down (Ctrl-C, SIGTERM), the engine stops with it:
    its stepping thread, and the tensor-parallel ranks it started."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        ctx.engine.shutdown()
        getattr(ctx.engine.engine, "shutdown", lambda: None)()

    app = FastAPI(title="slimquant", version="0.1.0", lifespan=lifespan)
    app.state.ctx, app.state.metrics = ctx, metrics
    _install_errors(app)
    _install_auth_and_counting(app, api_key, metrics)
    _install_routes(app, ctx, metrics)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    return app


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 (OpenAI's error object) before the app sees it; a
    declared Content-Length over it is refused without reading, a chunked body once the count passes it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body, more, replay = b"", True, []
        while more:  # buffer the body (the app reads all of it anyway), counting
            message = await receive()
            if message["type"] != "http.request":
                replay.append(message)
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send, more)
        replay.insert(0, {"type": "http.request", "body": body, "more_body": False})

        async def replayed():
            return replay.pop(0) if replay else await receive()

        return await self.app(scope, replayed, send)

    async def _refuse(self, scope, receive, send, more: bool = True) -> None:
        drained = 0  # read what the client still sends (up to a bound), so that it gets the answer
        while more and drained < 8 * self.max_bytes:
            message = await receive()
            drained += len(message.get("body", b""))
            more = message.get("type") == "http.request" and message.get("more_body", False)
        error = OpenAIError(
            f"the request body is larger than this server accepts ({self.max_bytes} bytes; see --max-request-bytes)",
            status=413,
            code="request_too_large",
        )
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    async def internal(_: Request, e: Exception):  # a failed step, a rank that failed: OpenAI's error object
        return JSONResponse(_internal(e).body(), status_code=500)

    # registered for Exception, Starlette also logs its traceback; a RankFailure is logged once, as the server stops
    app.add_exception_handler(RankFailure, internal)
    app.add_exception_handler(Exception, internal)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):  # a body that is not UTF-8, a wrong method, an unknown path
        body = OpenAIError(str(e.detail), status=e.status_code).body()
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":  # loc: ("body", the character where the decoder stopped)
            why = f" ({first.get('ctx', {}).get('error', 'malformed')} at character {loc[-1]})" if loc else ""
            message, loc = f"the request body is not valid JSON{why}", []
        return JSONResponse(OpenAIError(message, param=".".join(loc) or None).body(), status_code=400)


def _install_auth_and_counting(app: FastAPI, api_key: str | None, metrics: ServerMetrics | None) -> None:
    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        if (
            api_key
            and request.url.path.startswith("/v1")
            and request.headers.get("authorization") != f"Bearer {api_key}"
        ):
            e = OpenAIError(
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                status=401,
                type="authentication_error",
                code="invalid_api_key",
            )
            response = JSONResponse(e.body(), status_code=401)
        else:
            response = await call_next(request)
        if metrics is not None:
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response


def _install_routes(app: FastAPI, ctx: serving.ServingContext, metrics: ServerMetrics | None) -> None:
    @app.get("/health")
    @app.get("/ping")  # SageMaker's name for it, which vLLM answers too
    @app.post("/ping")
    async def health():
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "slimquant",
            "max_model_len": ctx.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await _respond(raw, _data_events(serving.create_completion(req, ctx)))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await _respond(raw, _data_events(serving.create_chat(req, ctx)))

    @app.post("/v1/responses")
    async def respond(req: ResponsesRequest, raw: Request):
        return await _respond(raw, responses.create_response(req, ctx))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = await serving.chat_prompt(req, ctx)
        else:
            ctx.check_text_length(req.prompt, "prompt")
            encoded = await ctx.run_tokenizer(ctx.tokenizer, req.prompt, add_special_tokens=req.add_special_tokens)
            ids = encoded.input_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        bad = [t for t in req.tokens if not 0 <= t < len(ctx.tokenizer)]
        if bad:
            raise OpenAIError(f"token ids must be in [0, {len(ctx.tokenizer)}), got {bad[:5]}", param="tokens")
        return {"prompt": await ctx.run_tokenizer(ctx.tokenizer.decode, req.tokens)}

    if metrics is not None:

        @app.get("/metrics")
        async def prometheus():
            return Response(metrics.render(), media_type="text/plain; version=0.0.4")


async def _respond(raw: Request, job: Awaitable[dict | AsyncIterator[str]]) -> Any:
    """JSON for a finished job, SSE for a stream; the work is cancelled if the client disconnects."""
    task = asyncio.ensure_future(job)
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            return Response(status_code=499)
    result = task.result()
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(_guard_stream(result), media_type="text/event-stream")


async def _data_events(job: Awaitable[dict | AsyncIterator[dict]]) -> dict | AsyncIterator[str]:
    """A finished completion as it is; a stream's chunks as server-sent events, then data: [DONE]."""
    result = await job
    if isinstance(result, dict):
        return result

    async def events() -> AsyncIterator[str]:
        async for chunk in result:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return events()


async def _guard_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors raised mid-stream become an error event instead of a broken connection."""
    try:
        async for event in events:
            yield event
    except OpenAIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    except Exception as e:
        if not isinstance(e, RankFailure):  # the server logs that once as it stops
            log.exception("stream failed")
        yield f"data: {json.dumps(_internal(e).body())}\n\n"


def _internal(e: Exception) -> OpenAIError:
    """The error object of a request that failed on the server's side (a failed step, a rank that failed)."""
    return OpenAIError(f"{type(e).__name__}: {e}", status=500, type="internal_error")


def make_server_app(
    llm: Any,
    model_name: str,
    api_key: str | None = None,
    chat_template: str | None = None,
    max_n: int = 16,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    on_fatal: Callable[[Exception], None] | None = None,
    tool_parser: str | None = None,
) -> tuple[FastAPI, AsyncEngine]:
    """Wire an LLM (its engine and tokenizer) into an app; returns the app and its engine thread (which calls
    on_fatal when the engine cannot go on)."""
    engine = llm.llm_engine
    async_engine = AsyncEngine(engine, on_fatal=on_fatal)
    metrics = ServerMetrics(async_engine.stats, model_name)
    async_engine.metrics = metrics
    ctx = serving.ServingContext(
        engine=async_engine,
        tokenizer=llm.get_tokenizer(),
        model_name=model_name,
        max_model_len=engine.config.max_model_len,
        max_n=max_n,
        chat_template=chat_template,
        generation_defaults=dict(engine.generation_defaults),
        tool_parser=tool_parser,
    )
    return build_app(ctx, api_key=api_key, metrics=metrics, max_request_bytes=max_request_bytes), async_engine
