"""The cluster's metrics: the ingress's own, each replica's residency, and every replica's own.

`ClusterMetrics.render` makes the ingress's `/metrics`: its counters (requests, placements,
retries, cut streams), gauges per replica from the replicas' routing reports (resident subtrees
and blocks, RAM hits and misses), then the text of each replica's own `/metrics` parsed and
labelled with `replica`, one family per name (docs/cluster.md, "Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class ClusterMetrics:
    """The ingress's own counters, and the per-replica view from the routing reports."""

    def __init__(self, reports: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hmem_cluster_requests", "Requests answered by the ingress", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.placed = Counter(
            "hmem_cluster_placed",
            "Routed requests by where they went: a replica holding their path (resident), "
            "their subtree's home, spilled off a busy holder, elsewhere (other), or anywhere "
            "(any: no residency routing)",
            ["how"],
            registry=r,
        )
        self.retries = Counter(
            "hmem_cluster_retries", "Attempts sent again, by why", ["reason"], registry=r
        )
        self.lost = Counter(
            "hmem_cluster_streams_cut",
            "Streams ended by a lost replica after tokens were sent",
            registry=r,
        )
        r.register(_ReplicaCollector(reports))

    def render(self, replica_texts: dict[str, str]) -> bytes:
        """This registry's text, then `replica_texts` (replica id -> its /metrics) relabelled."""
        relabelled = CollectorRegistry()
        relabelled.register(_Relabelled(replica_texts))
        return generate_latest(self.registry) + generate_latest(relabelled)


class _ReplicaCollector(Collector):
    """Per-replica gauges from the replicas' routing reports."""

    def __init__(self, reports: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.reports = reports

    def collect(self) -> Iterable[Metric]:
        reports = self.reports()
        up = GaugeMetricFamily(
            "hmem_replica_reporting",
            "1 when the replica has sent the router a residency report",
            labels=["replica"],
        )
        subtrees = GaugeMetricFamily(
            "hmem_replica_resident_subtrees",
            "Level-1 subtrees with any block in the replica's RAM cache",
            labels=["replica"],
        )
        blocks = GaugeMetricFamily(
            "hmem_replica_resident_blocks",
            "Blocks of each level in the replica's RAM cache",
            labels=["replica", "level"],
        )
        hits = GaugeMetricFamily(
            "hmem_replica_ram_hits", "RAM cache hits since the replica started", labels=["replica"]
        )
        misses = GaugeMetricFamily(
            "hmem_replica_ram_misses",
            "RAM cache misses since the replica started",
            labels=["replica"],
        )
        ratio = GaugeMetricFamily(
            "hmem_replica_ram_hit_ratio",
            "RAM cache hits / (hits + misses) since the replica started",
            labels=["replica"],
        )
        for rid, stats in sorted(reports.items()):
            up.add_metric([rid], 1.0 if stats else 0.0)
            resident = {int(k): v for k, v in stats.get("resident", {}).items()}
            top = min(resident, default=None)
            subtrees.add_metric([rid], float(len(resident[top]) if top is not None else 0))
            for level, nodes in sorted(resident.items()):
                blocks.add_metric([rid, str(level)], float(len(nodes)))
            h, m = stats.get("hits", 0), stats.get("misses", 0)
            hits.add_metric([rid], float(h))
            misses.add_metric([rid], float(m))
            ratio.add_metric([rid], h / (h + m) if h + m else 0.0)
        yield from (up, subtrees, blocks, hits, misses, ratio)


class _Relabelled(Collector):
    """Metric families parsed from replicas' /metrics, each sample labelled with its replica."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for rid, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for s in family.samples:
                    out.samples.append(s._replace(labels={**s.labels, "replica": rid}))
        yield from merged.values()
