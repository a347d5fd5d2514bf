"""Ray Serve request routers for the engine replicas: residency routing, and Ray's own.

`ResidencyRouter` ranks replicas with `placement.rank` from the path the ingress put on each
request (`Forward.route`), what each replica reported its RAM cache holds (its routing stats,
polled by Serve's controller every `request_routing_stats_period_s`) and, since those are up to
a period old, what this process saw each replica serve since (`OBSERVED`): the second request of
a subtree goes where the first went, not wherever a stale report points. Load is Serve's own
count of each replica's requests in flight. Serve then sends the request to the least loaded
replica of the first rank that has room (`max_ongoing_requests`), else of the next rank.

`RayDefaultRouter` is Ray Serve's power of two choices, unchanged for every routed request: the
baseline `python -m bench.cluster` measures residency routing against.

Both honour `Forward.target` (one replica and no other: the ingress's metrics fan-out and
broadcasts) and `Forward.avoid` (replicas that already failed this request), and register
themselves in this process (`routing_state.live_routers`), where the ingress reads the live
replicas and their reports.

The routers run in the process that holds the handle (the ingress replica), and share what
they learn with the ingress through `server.cluster.routing_state`. Serve ships this module to
that process by value (cloudpickle), so any state kept here would be a copy: it keeps none.
"""

from __future__ import annotations

from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from server.cluster import routing_state
from server.cluster.bridge import Forward
from server.cluster.placement import Candidate, Residency, rank


def _forward(pending_request: PendingRequest | None) -> Forward | None:
    if pending_request is None or not pending_request.args:
        return None
    arg = pending_request.args[0]
    return arg if isinstance(arg, Forward) else None


def _id(replica: RunningReplica) -> str:
    return str(replica.replica_id.to_full_id_str())


class _Directed:
    """Targets and avoids, which both routers honour before their own policy (`_choose`)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        fwd = _forward(pending_request)
        if fwd is not None and fwd.target is not None:
            return [[r for r in candidate_replicas if _id(r) == fwd.target]]
        candidates = list(candidate_replicas)
        if fwd is not None and fwd.avoid:
            candidates = [r for r in candidates if _id(r) not in fwd.avoid] or candidates
        return await self._choose(fwd, candidates, pending_request)

    async def _choose(
        self,
        fwd: Forward | None,
        candidates: list[RunningReplica],
        pending_request: PendingRequest | None,
    ) -> list[list[RunningReplica]]:
        raise NotImplementedError


class ResidencyRouter(_Directed, RequestRouter):
    """Prefers the replica whose RAM cache holds the longest prefix of the request's path."""

    def initialize_state(self, spill: int = 4, observed_ttl_s: float = 5.0, **_: Any) -> None:
        self.spill = max(1, int(spill))
        self.observed_ttl_s = observed_ttl_s
        routing_state.register(self)

    def _candidate(self, replica: RunningReplica) -> Candidate:
        rid = _id(replica)
        stats = replica.routing_stats or {}
        residency = Residency.of(stats.get("resident", {}))
        residency = residency.merged(routing_state.OBSERVED.recent(rid, self.observed_ttl_s))
        load = self._replica_queue_len_cache.get(replica.replica_id) or 0
        return Candidate(rid, residency, load)

    async def _choose(
        self,
        fwd: Forward | None,
        candidates: list[RunningReplica],
        pending_request: PendingRequest | None,
    ) -> list[list[RunningReplica]]:
        by_id = {_id(r): r for r in candidates}
        ranking = rank(
            None if fwd is None else fwd.route,
            [self._candidate(r) for r in candidates],
            spill=self.spill,
            subtrees=0 if fwd is None else fwd.subtrees,
        )
        if fwd is not None:
            routing_state.DECISIONS.put(fwd.attempt, ranking.how, ranking.preferred)
        return [[by_id[rid] for rid in ids] for ids in ranking.ranks]

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        routing_state.OBSERVED.forget(replica_id.to_full_id_str())


class RayDefaultRouter(_Directed, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's power of two choices, with targets and avoids (the baseline)."""

    def initialize_state(self, **_: Any) -> None:
        routing_state.register(self)

    async def _choose(
        self,
        fwd: Forward | None,
        candidates: list[RunningReplica],
        pending_request: PendingRequest | None,
    ) -> list[list[RunningReplica]]:
        if fwd is not None and len(candidates) < len(self._replicas_list):
            return [candidates]  # some avoided: any of the others
        if fwd is not None:
            routing_state.DECISIONS.put(fwd.attempt, "any", frozenset())
        return await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self, candidates, pending_request
        )
