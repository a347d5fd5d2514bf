"""Prometheus metrics of the store: per tier and level, on a registry the caller owns.

Event metrics (reads, bytes, latency, fetch outcomes) are observed by the store as they happen.
State metrics (breaker states, cache bytes, hits and evictions of the RAM cache and of capped
tiers) are read from their owners at scrape time by a collector, so they can never drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tiers.breaker import BreakerState
from tiers.cache import CacheStats

# Seconds: from an LMDB page-cache hit (tens of microseconds) to a slow cloud read.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """What the collector reads at scrape time."""

    cache: CacheStats
    breakers: dict[str, BreakerState]
    capped: dict[str, tuple[int, int, int, int]]  # tier -> (bytes, cap, evictions, evicted bytes)
    unrepaired: dict[int, int] = field(default_factory=dict)  # level -> blocks with no good copy


class StoreMetrics:
    """The store's metrics. Pass a fresh `CollectorRegistry` per store in tests."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tier_reads = Counter(
            "hmem_tier_reads",
            "Block reads sent to a tier, by result: hit, miss, error, corrupt, timeout, skipped",
            ["tier", "level", "result"],
            registry=r,
        )
        self.tier_read_bytes = Counter(
            "hmem_tier_read_bytes", "Verified bytes read from a tier", ["tier", "level"], registry=r
        )
        self.tier_read_seconds = Histogram(
            "hmem_tier_read_seconds",
            "Latency of successful tier reads, verification and decoding included",
            ["tier", "level"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "hmem_block_fetch_seconds",
            "Latency of a block fetch through the store (RAM cache hits included)",
            ["level", "source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fetches = Counter(
            "hmem_block_fetches",
            "Block fetches by outcome: cached, loaded, timeout, not_found, corrupt, failed",
            ["level", "outcome"],
            registry=r,
        )
        self.promotions = Counter(
            "hmem_tier_promotions",
            "Blocks written into a cache tier that missed them, by result: ok, error, skipped",
            ["tier", "result"],
            registry=r,
        )
        self.corrupt = Counter(
            "hmem_tier_corrupt",
            "Copies read from a tier that failed verification (size, sha256 or decoding)",
            ["tier", "level"],
            registry=r,
        )
        self.repairs = Counter(
            "hmem_tier_repairs",
            "Corrupt copies overwritten with verified bytes from another tier, by result: ok, "
            "error, skipped (read-only tier, writes off or too many in flight)",
            ["tier", "result"],
            registry=r,
        )
        self.hedges = Counter(
            "hmem_store_hedges",
            "Reads of the next tier started because a read was still pending after "
            "hedge_after_s, by result: won (it served the block) or lost",
            ["level", "result"],
            registry=r,
        )
        self.deadline_misses = Counter(
            "hmem_tier_deadline_misses",
            "Tier reads still running when a caller's deadline passed (each counts against the "
            "tier's circuit breaker, then)",
            ["tier", "level"],
            registry=r,
        )

    def watch(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        """Export the state metrics of a store through `snapshot`, read at every scrape."""
        self.registry.register(_StateCollector(snapshot))


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return self._families(None)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return self._families(self._snapshot())

    @staticmethod
    def _families(s: StoreSnapshot | None) -> list[GaugeMetricFamily | CounterMetricFamily]:
        breaker = GaugeMetricFamily(
            "hmem_tier_breaker_state",
            "Circuit breaker state per tier: 0 closed, 1 open, 2 half-open",
            labels=["tier"],
        )
        cache_bytes = GaugeMetricFamily(
            "hmem_cache_bytes",
            "Bytes held by a cache (ram, or a capped tier)",
            labels=["cache"],
        )
        cache_cap = GaugeMetricFamily(
            "hmem_cache_capacity_bytes", "Byte budget of a cache", labels=["cache"]
        )
        pinned = GaugeMetricFamily("hmem_cache_pinned_bytes", "Pinned bytes in the RAM cache")
        entries = GaugeMetricFamily("hmem_cache_entries", "Blocks in the RAM cache")
        lookups = CounterMetricFamily(
            "hmem_cache_lookups", "RAM cache lookups by result", labels=["result"]
        )
        evictions = CounterMetricFamily(
            "hmem_cache_evictions", "Blocks evicted from a cache", labels=["cache"]
        )
        evicted = CounterMetricFamily(
            "hmem_cache_evicted_bytes", "Bytes evicted from a cache", labels=["cache"]
        )
        unrepaired = GaugeMetricFamily(
            "hmem_store_unrepaired_blocks",
            "Blocks of a level last found corrupt in every tier that held them (no good copy)",
            labels=["level"],
        )
        families: list[GaugeMetricFamily | CounterMetricFamily] = [
            breaker, cache_bytes, cache_cap, pinned, entries, lookups, evictions, evicted,
            unrepaired,
        ]  # fmt: skip
        if s is None:
            return families
        for level, n in sorted(s.unrepaired.items()):
            unrepaired.add_metric([str(level)], n)
        for tier, state in s.breakers.items():
            breaker.add_metric([tier], int(state))
        c = s.cache
        cache_bytes.add_metric(["ram"], c.bytes)
        cache_cap.add_metric(["ram"], c.capacity_bytes)
        pinned.add_metric([], c.pinned_bytes)
        entries.add_metric([], c.entries)
        lookups.add_metric(["hit"], c.hits)
        lookups.add_metric(["miss"], c.misses)
        evictions.add_metric(["ram"], c.evictions)
        evicted.add_metric(["ram"], c.evicted_bytes)
        for tier, (held, cap, n_evicted, b_evicted) in s.capped.items():
            cache_bytes.add_metric([tier], held)
            cache_cap.add_metric([tier], cap)
            evictions.add_metric([tier], n_evicted)
            evicted.add_metric([tier], b_evicted)
        return families
