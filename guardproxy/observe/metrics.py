"""Prometheus metrics. One registry per app (tests run many apps in one process; the global registry
would refuse the second). Engine gauges are read at scrape time, so they cannot drift from the engine.

With several proxy workers (``server.workers`` > 1) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
for every process it starts: counters and histograms are then kept in files there (prometheus-client's
multiprocess mode), and whichever worker answers a scrape sums every process's, the engine process's
step histograms included. The engine's gauges come from the engine's statistics, which each worker
receives, so they are reported once, not summed."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Engine counters read at scrape time: (metric name without _total, help, EngineStats attribute).
_ENGINE_COUNTERS = (
    (
        "guardproxy_engine_slides",
        "Streams that reached the guard's context and went on on a window.",
        "slides",
    ),
    (
        "guardproxy_engine_memory_waits",
        "Times a stream waited for guard KV memory (the pool was full).",
        "memory_waits",
    ),
    (
        "guardproxy_engine_memory_timeouts",
        "Memory waits that ran out (the stream failed by the policy's on_guard_error).",
        "memory_timeouts",
    ),
    ("guardproxy_engine_prefill_tokens", "Context tokens the guard computed.", "prefill_tokens"),
    (
        "guardproxy_engine_prefix_hit_tokens",
        "Context tokens served from the prefix cache instead of computed.",
        "prefix_hit_tokens",
    ),
    ("guardproxy_engine_prefix_evictions", "Cached KV pages given up for room.", "evictions"),
)


_ENGINE_GAUGES = (
    ("guardproxy_engine_active_streams", "Live guard streams.", "active_streams"),
    ("guardproxy_engine_queued_streams", "Streams waiting for room.", "queued_streams"),
    ("guardproxy_engine_cached_tokens", "KV positions in use.", "cached_tokens"),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._stats()
        for name, doc, attr in _ENGINE_GAUGES:
            yield GaugeMetricFamily(name, doc, value=getattr(s, attr))
        for name, doc, attr in _ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(s, attr))
        yield GaugeMetricFamily(
            "guardproxy_engine_prefix_cached_pages",
            "KV pages in the prefix cache (held by streams or waiting for reuse).",
            value=s.cached_pages,
        )


# Seconds: from sub-millisecond proxy overhead to multi-second CPU guard steps.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "guardproxy_requests", "Requests by route and HTTP status.", ["route", "status"], registry=r
        )
        self.prompt_verdicts = Counter(
            "guardproxy_prompt_verdicts",
            "Prompt verdicts by risk, category, action.",
            ["risk", "category", "action"],
            registry=r,
        )
        self.response_actions = Counter(
            "guardproxy_response_actions",
            "Responses flagged, redacted or cut, by action, risk and category.",
            ["action", "risk", "category"],
            registry=r,
        )
        self.prompt_windows = Counter(
            "guardproxy_prompt_windows",
            "Prompts longer than the guard's context, judged in windows: prompts, and windows judged.",
            ["kind"],
            registry=r,
        )
        self.guard_failures = Counter(
            "guardproxy_guard_failures", "Requests whose guard failed, by policy mode.", ["mode"], registry=r
        )
        self.batch_tokens = Histogram(
            "guardproxy_engine_batch_tokens", "Tokens per batched guard forward.", buckets=_TOKENS, registry=r
        )
        self.batch_streams = Histogram(
            "guardproxy_engine_batch_streams",
            "Streams per batched guard forward.",
            buckets=_TOKENS,
            registry=r,
        )
        self.batch_workers = Histogram(
            "guardproxy_engine_batch_workers",
            "Proxy workers whose streams one batched guard forward held (server.workers > 1).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.step_seconds = Histogram(
            "guardproxy_engine_step_seconds", "Time of one guard forward.", buckets=_LATENCY, registry=r
        )
        self.verdict_wait = Histogram(
            "guardproxy_token_verdict_wait_seconds",
            "From feeding response tokens to their verdicts.",
            buckets=_LATENCY,
            registry=r,
        )
        self.chunk_added_latency = Histogram(
            "guardproxy_chunk_added_latency_seconds",
            "Proxy-added latency per released chunk: upstream arrival of its oldest text to its release.",
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "guardproxy_time_to_first_token_seconds",
            "Time to the first text: `proxy` as the client sees it, `upstream` as the proxy does.",
            ["source"],
            buckets=_LATENCY,
            registry=r,
        )

        self.verdict_waits = (0, 0.0)  # (count, seconds) of every verdict wait: the live view's mean
        self._engine: _EngineCollector | None = None

    def observe_verdict_wait(self, seconds: float) -> None:
        self.verdict_wait.observe(seconds)
        count, total = self.verdict_waits
        self.verdict_waits = (count + 1, total + seconds)

    def bind_engine(self, stats: Callable[[], Any]) -> None:
        """``stats()`` -> the engine's ``EngineStats``, read at every scrape."""
        self._engine = _EngineCollector(stats)
        self.registry.register(self._engine)

    def observe_step(self, tokens: int, streams: int, seconds: float) -> None:
        self.batch_tokens.observe(tokens)
        self.batch_streams.observe(streams)
        self.step_seconds.observe(seconds)

    def render(self) -> bytes:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        # Every process's counters and histograms from their files, the engine's state once.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if self._engine is not None:
            registry.register(self._engine)
        return generate_latest(registry)
