"""What the request routers learn, shared with the ingress in the same process.

Serve builds a deployment's request router from its class, pickled by value with its whole
module (`server.cluster.router`), in the process that holds the handle: the ingress replica.
State the ingress must read (which replicas are live and what they reported, why each attempt
went where it went) and state it writes for the router (what it saw each replica serve) lives
here, in a module imported by name on both sides, so both see one copy.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import RequestRouter

from server.cluster.bridge import Route
from server.cluster.placement import How


class Observed:
    """What this process saw each replica serve, kept until its reports are surely newer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, dict[tuple[int, int], float]] = {}

    def record(self, replica: str, route: Route) -> None:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(replica, {})
            for pair in route:
                seen[pair] = now

    def recent(self, replica: str, max_age_s: float) -> dict[int, set[int]]:
        cutoff = time.monotonic() - max_age_s
        out: dict[int, set[int]] = {}
        with self._lock:
            seen = self._seen.get(replica)
            if not seen:
                return out
            for (level, node), at in list(seen.items()):
                if at < cutoff:
                    del seen[(level, node)]
                else:
                    out.setdefault(level, set()).add(node)
        return out

    def forget(self, replica: str) -> None:
        with self._lock:
            self._seen.pop(replica, None)


class Decisions:
    """Why each attempt's first rank was chosen, until the ingress reads it (bounded)."""

    def __init__(self, keep: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._by_attempt: OrderedDict[str, tuple[How, frozenset[str]]] = OrderedDict()

    def put(self, attempt: str, how: How, preferred: frozenset[str]) -> None:
        with self._lock:
            self._by_attempt[attempt] = (how, preferred)
            while len(self._by_attempt) > self._keep:
                self._by_attempt.popitem(last=False)

    def pop(self, attempt: str) -> tuple[How, frozenset[str]] | None:
        with self._lock:
            return self._by_attempt.pop(attempt, None)


OBSERVED = Observed()
DECISIONS = Decisions()
_routers: list[RequestRouter] = []
_routers_lock = threading.Lock()


def register(router: RequestRouter) -> None:
    with _routers_lock:
        _routers.append(router)


def live_routers() -> list[RequestRouter]:
    with _routers_lock:
        return list(_routers)


def replica_reports() -> dict[str, dict[str, Any]]:
    """Every live replica this process routes to, and its last routing stats ({} if none yet)."""
    out: dict[str, dict[str, Any]] = {}
    for router in live_routers():
        for rid, replica in router.curr_replicas.items():
            out[rid.to_full_id_str()] = dict(replica.routing_stats or {})
    return out
