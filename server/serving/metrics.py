"""Prometheus metrics of the HTTP server, the serving layer and the engine, on a registry the app
owns.

`/metrics` serves these together with the store's (`tiers.StoreMetrics`: reads, bytes, fetch
times and cache figures per tier and level).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.engine import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        if s is None:
            return
        yield GaugeMetricFamily("hmem_engine_active_sequences", "Sequences in the batch", s.active)
        yield GaugeMetricFamily("hmem_engine_waiting_sequences", "Sequences queued", s.waiting)
        yield GaugeMetricFamily("hmem_engine_max_batch", "Batch slots", s.max_batch)
        yield CounterMetricFamily(
            "hmem_engine_cancelled_sequences", "Sequences ended by their caller", s.cancelled
        )


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hmem_http_requests", "Completed HTTP requests", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "hmem_time_to_first_token_seconds",
            "From request arrival to the first generated token",
            ["memory"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.memory_fetch = Histogram(
            "hmem_memory_resolve_seconds",
            "Routing and fetching one prompt's memory",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("hmem_generated_tokens", "Tokens generated", ["memory"], registry=r)
        # Per-token counters, looked up once rather than by label on every token.
        self.tokens_by_memory = {m: self.tokens.labels(m) for m in ("on", "off")}
        self.prompt_tokens = Counter("hmem_prompt_tokens", "Prompt tokens processed", registry=r)
        self.degraded = Counter(
            "hmem_memory_degraded",
            "Levels served by the fallback, by reason",
            ["level", "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "hmem_rejected_requests", "Requests refused at the door", ["reason"], registry=r
        )
        r.register(_EngineCollector(stats))

    def render(self, *others: CollectorRegistry) -> bytes:
        return b"".join(generate_latest(reg) for reg in (self.registry, *others))
