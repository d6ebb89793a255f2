"""Prometheus metrics of the server: requests, tokens, latency, queue and KV-cache gauges."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One registry per server, so several servers (tests) never collide."""

    def __init__(self, engine_stats: Callable[[], dict[str, float]]):
        self.registry = CollectorRegistry()
        self._engine_stats = engine_stats
        r = self.registry
        self.requests = Counter(
            "slimquant_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.finished = Counter(
            "slimquant_request_success",
            "Finished requests by reason (stop, length, abort)",
            ["finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("slimquant_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("slimquant_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "slimquant_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "slimquant_time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("slimquant_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("slimquant_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("slimquant_kv_cache_usage_perc", "Fraction of KV-cache blocks in use", registry=r)

    def observe_request(
        self, reason: str, prompt_tokens: int, output_tokens: int, ttft: float | None, decode_time: float
    ) -> None:
        """Record one finished (or aborted) generation."""
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if output_tokens > 1:
            self.tpot.observe(decode_time / (output_tokens - 1))

    def render(self) -> bytes:
        """The text exposition format, gauges refreshed from the engine."""
        stats = self._engine_stats()
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.kv_usage.set(stats.get("kv_cache_usage", 0.0))
        return generate_latest(self.registry)
