"""Prometheus metrics of the server: requests, tokens, latency, queue and KV-cache gauges. The engine's carry vLLM's
names and its model_name label, so dashboards made for vLLM read them as they are."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One registry per server, so several servers (tests) never collide."""

    def __init__(self, engine_stats: Callable[[], dict[str, float]], model_name: str):
        self.registry = CollectorRegistry()
        self._engine_stats = engine_stats
        self.model_name = model_name
        r = self.registry
        self.requests = Counter(
            "slimquant_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.finished = Counter(
            "vllm:request_success",
            "Finished requests by reason (stop, length, abort)",
            ["model_name", "finished_reason"],
            registry=r,
        )
        # the rest for this model only (its series shown from the start, as vLLM's are)
        mine = ["model_name"]

        def own(metric):  # the series of this model
            return metric.labels(model_name)

        self.prompt_tokens = own(Counter("vllm:prompt_tokens", "Prompt tokens processed", mine, registry=r))
        self.generation_tokens = own(Counter("vllm:generation_tokens", "Tokens generated", mine, registry=r))
        self.ttft = own(
            Histogram("vllm:time_to_first_token_seconds", "Time to first token", mine, buckets=_BUCKETS, registry=r)
        )
        self.tpot = own(
            Histogram(
                "vllm:time_per_output_token_seconds", "Time per output token after the first", mine, buckets=_BUCKETS,
                registry=r,
            )
        )  # fmt: skip
        self.running = own(Gauge("vllm:num_requests_running", "Requests in the running batch", mine, registry=r))
        self.waiting = own(Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", mine, registry=r))
        self.kv_usage = own(Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use", mine, registry=r))

    def observe_request(
        self, reason: str, prompt_tokens: int, output_tokens: int, ttft: float | None, decode_time: float
    ) -> None:
        """Record one finished (or aborted) generation."""
        self.finished.labels(self.model_name, reason).inc()
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
