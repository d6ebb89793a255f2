"""One background thread steps the engine for every request; asyncio handlers await their outputs.

Requests join and leave between steps (continuous batching); a request whose consumer goes away
(client disconnect) is aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from slimquant.errors import RankFailure

log = logging.getLogger(__name__)


class AsyncEngine:
    """Thread-safe, asyncio-facing wrapper around an LLMEngine."""

    def __init__(self, engine: Any, metrics: Any = None, on_fatal: Callable[[Exception], None] | None = None):
        """on_fatal(error): called once, from the engine thread, when the engine cannot go on (a rank died)."""
        self.engine = engine
        self.metrics = metrics  # ServerMetrics or None
        self.on_fatal = on_fatal
        self._failure: RankFailure | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="slimquant-engine", daemon=True)
        self._thread.start()

    def add(self, request_id: str, prompt: Any, params: Any) -> RequestStream:
        """Queue a request now (ValueError for bad input, nothing added); its outputs come from the stream."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._queues[request_id] = (loop, queue)
        self._wake.set()
        return RequestStream(self, request_id, queue)

    def compile_grammar(self, structured: Any) -> None:
        """Compile a request's structured output into the engine's grammar cache, outside the engine lock (slow for a
        big schema; adding the request then finds it compiled); ParamError when it does not compile."""
        self.engine.grammars.compile(structured)

    async def generate(self, request_id: str, prompt: Any, params: Any) -> AsyncIterator[Any]:
        """Add a request and yield its RequestOutputs until finished; aborts it if the consumer stops early."""
        async for out in self.add(request_id, prompt, params).outputs():
            yield out

    def abort(self, request_id: str) -> None:
        """Cancel a request and free its KV blocks (no-op if already finished)."""
        with self._lock:
            self._queues.pop(request_id, None)
            self.engine.abort_request(request_id)

    def stats(self) -> dict[str, float]:
        """Engine gauges for /metrics (running, waiting, KV-cache use)."""
        with self._lock:
            return self.engine.stats() if hasattr(self.engine, "stats") else {}

    def shutdown(self) -> None:
        """Stop the stepping thread."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(timeout=0.5)
            try:
                getattr(self.engine, "check_health", lambda: None)()
            except RankFailure as e:
                self._failure = e
            while not self._stopped and self._failure is None and self._step():
                pass
            if self._failure is not None:
                self._fatal(self._failure)
            self._wake.clear()

    def _fatal(self, error: Exception) -> None:
        """The engine is gone: fail every request, stop stepping, tell the owner (the server exits)."""
        log.error("the engine failed and cannot go on: %s", error)
        with self._lock:
            self._fail_all(error)
        self._stopped = True
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _step(self) -> bool:
        """Run one engine step and deliver its outputs; False when there is nothing to do."""
        with self._lock:
            if not self.engine.has_unfinished_requests():
                return False
            try:
                outputs = self.engine.step()
            except RankFailure as e:
                self._failure = e  # handled by _run, outside the lock
                return False
            except Exception as e:  # a failing step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(e)
                return False
            for out in outputs:
                self._deliver(out.request_id, out, remove=out.finished)
        return True

    def _deliver(self, request_id: str, item: Any, remove: bool) -> None:
        entry = self._queues.pop(request_id, None) if remove else self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._queues):
            self.engine.abort_request(request_id)
            self._deliver(request_id, error, remove=True)


class RequestStream:
    """One queued request's outputs; the request is aborted if its consumer stops before it finishes."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine, self.request_id, self.queue = engine, request_id, queue
        self.last: Any = None  # the newest RequestOutput

    async def outputs(self) -> AsyncIterator[Any]:
        """Yield RequestOutputs until the finished one."""
        finished, timing, last = False, _Timing(), None
        try:
            while not finished:
                out = await self.queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished, last = out.finished, out
                self.last = out
                timing.tick()
                yield out
        finally:
            if not finished:
                self.engine.abort(self.request_id)
            metrics = self.engine.metrics
            if metrics is not None and last is not None:
                n_out = sum(len(c.token_ids) for c in last.outputs)
                reason = (last.outputs[0].finish_reason or "abort") if finished else "abort"
                metrics.observe_request(reason, len(last.prompt_token_ids), n_out, timing.ttft, timing.decode_time)

    async def final(self) -> Any:
        """The last (finished) RequestOutput."""
        async for _ in self.outputs():
            pass
        return self.last


async def interleaved(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(i, output) of streams[i] as each comes, so several prompts' outputs interleave as the engine makes them (as
    vLLM's do); outputs that come together go in the streams' order. All are closed when this stops."""
    if len(streams) == 1:  # a chat, or one prompt: no task per output (they cost about 12 µs each)
        async with contextlib.aclosing(streams[0].outputs()) as outputs:
            async for out in outputs:
                yield 0, out
        return
    outputs = [stream.outputs() for stream in streams]
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(outputs)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(outputs[i]))] = i
                yield i, out
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # each ends its generator (aborting the request)
        for it in outputs:
            await it.aclose()


class _Timing:
    """Arrival times of a request's outputs: time to first token and decode time after it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start

    def tick(self) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def decode_time(self) -> float:
        return 0.0 if self.first is None else self.last - self.first
