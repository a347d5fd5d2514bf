"""Memory resolution: from a prompt to the blocks a sequence decodes with, and a report of how.

This is the one place where tiers meet the model. For a prompt it routes (or takes an explicit
path), drops levels the request or the key's policy leaves out, refuses blocked clusters before
any tier sees them, fetches the remaining levels concurrently through the `TieredStore`, and
replaces every level it could not use with the fallback (the bank's generic memory of that
level, or nothing). It never raises for tier trouble: a late or failed level is degraded and
reported, so an outage never becomes a 5xx.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from server.engine.blocklist import Blocklist
from server.engine.errors import RequestError
from server.model.memory import MemoryBlock
from server.routing.tree import Router, node_ids
from server.settings import KeyPolicy, MemoryMode
from tiers import Fetched, TieredStore
from tiers.errors import BlockNotFoundError, CorruptBlockError, FetchTimeoutError
from tiers.keys import BlockKey

Fallback = Literal["generic", "none"]
Reason = Literal["blocked", "disabled", "late", "unavailable", "missing", "corrupt"]
# Longer prompts are embedded in the executor even with hashed TF-IDF (its cost grows with text).
_INLINE_ROUTE_CHARS = 4096

# Paths already routed for this request's texts (route text -> path of child indices): the
# cluster's ingress routes every prompt to place the request, and a replica takes its paths
# rather than embedding the same text again (server/cluster/bridge.py; only for the same build).
route_hints: ContextVar[Mapping[str, tuple[int, ...]]] = ContextVar(
    "route_hints", default=MappingProxyType({})
)


class MemoryRequestError(RequestError):
    """A memory request that cannot be served (a 4xx); `param` names the field."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_memory") -> None:
        super().__init__(message, param=param, code=code)


class MemoryForbiddenError(MemoryRequestError):
    """The key's policy does not allow what was asked (a 403)."""


@dataclass(frozen=True, slots=True)
class MemoryRequest:
    mode: MemoryMode = "auto"
    path: tuple[int, ...] | None = None  # child indices (i1, ..., iL), as the paper writes paths
    levels: tuple[int, ...] | None = None  # the subset of levels to use; None: all


@dataclass(frozen=True, slots=True)
class BlockReport:
    level: int
    node: int
    tier: str | None  # the tier that served it ("ram": the cache); None: not fetched
    cached: bool
    fetch_ms: float
    corrupt: tuple[str, ...] = ()  # tiers whose copy failed its digest (repaired in background)

    @classmethod
    def of(cls, level: int, node: int, got: Fetched[MemoryBlock]) -> BlockReport:
        return cls(level, node, got.tier, got.cached, got.seconds * 1e3, got.corrupt)

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "node": self.node,
            "tier": self.tier,
            "cached": self.cached,
            "fetch_ms": round(self.fetch_ms, 3),
            "corrupt": list(self.corrupt),
        }


@dataclass(frozen=True, slots=True)
class Degraded:
    level: int
    reason: Reason
    fallback: Literal["generic", "none"]

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "reason": self.reason, "fallback": self.fallback}


@dataclass(slots=True)
class ResolvedMemory:
    """The blocks one prompt's sequences decode with, and the response's `memory` object."""

    mode: MemoryMode
    path: tuple[int, ...] | None
    node_ids: tuple[int, ...] | None
    blocks: list[MemoryBlock]
    reports: list[BlockReport] = field(default_factory=list)
    degraded: list[Degraded] = field(default_factory=list)
    blocked: list[int] = field(default_factory=list)
    fetch_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "path": None if self.path is None else list(self.path),
            "blocks": [r.as_dict() for r in self.reports],
            "fetch_ms": round(self.fetch_ms, 3),
            "degraded": [d.as_dict() for d in self.degraded],
            "blocked": list(self.blocked),
        }


def _failure(error: Exception | None) -> Literal["late", "missing", "unavailable", "corrupt"]:
    """Why a level's block did not come: past its deadline, not in any tier, every copy failing
    its digest, or tiers failing."""
    if isinstance(error, FetchTimeoutError):
        return "late"
    if isinstance(error, CorruptBlockError):
        return "corrupt"
    if isinstance(error, BlockNotFoundError):
        return "missing"
    return "unavailable"


class MemoryResolver:
    """Routes prompts and fetches their blocks under the blocklist and a key's policy."""

    def __init__(
        self,
        *,
        bank_id: str,
        router: Router,
        store: TieredStore[MemoryBlock],
        memory_levels: Sequence[int],
        branching: int,
        generic: Mapping[int, MemoryBlock],
        blocklist: Blocklist,
        fallback: Fallback = "generic",
        deadline_s: float | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.bank_id = bank_id
        self.router = router
        self.store = store
        self.levels = list(memory_levels)
        self.depth = router.tree.levels
        self.branching = branching
        self.generic = dict(generic)
        self.blocklist = blocklist
        self.fallback: Fallback = fallback
        self.deadline_s = deadline_s
        self.executor = executor  # where routing runs; None: the event loop's default pool

    # -- paths ----------------------------------------------------------------------------------

    def node_ids(self, path: Sequence[int]) -> tuple[int, ...]:
        """Global node ids of a path of child indices (level 1 first)."""
        return node_ids(path, self.branching)

    async def route(self, text: str) -> tuple[tuple[int, ...], tuple[int, ...], list[float]]:
        """(path, node ids, distances) of a text.

        Hashed TF-IDF routes a prompt in about 0.1 ms, less than a hand-off to a worker thread
        and back costs under load, so it runs on the event loop (whose torch is single-threaded,
        `server.engine.threads`); MiniLM (about 5 ms) runs in the executor. A path the cluster's
        ingress routed already (`route_hints`) is taken as it is, with no distances.
        """
        if (hinted := route_hints.get().get(text)) is not None:
            return tuple(hinted), self.node_ids(hinted), []
        if self.router.routes_sparsely and len(text) <= _INLINE_ROUTE_CHARS:
            nodes, choices, dists = self.router.route_one(text)
        else:
            loop = asyncio.get_running_loop()
            nodes, choices, dists = await loop.run_in_executor(
                self.executor, self.router.route_one, text
            )
        return tuple(choices), tuple(nodes), dists

    def check_path(self, path: Sequence[int]) -> tuple[int, ...]:
        if len(path) != self.depth:
            raise MemoryRequestError(
                f"memory.path has {len(path)} entries; this bank's paths have {self.depth} "
                f"(one child index per level)",
                param="memory.path",
            )
        for level, i in enumerate(path, start=1):
            if not 0 <= i < self.branching:
                raise MemoryRequestError(
                    f"memory.path[{level - 1}] is {i}; child indices are 0..{self.branching - 1}",
                    param="memory.path",
                )
        return tuple(path)

    def check_levels(self, levels: Sequence[int]) -> tuple[int, ...]:
        for level in levels:
            if level not in self.levels:
                raise MemoryRequestError(
                    f"memory.levels names level {level}; this bank's memory levels are "
                    f"{self.levels}",
                    param="memory.levels",
                )
        return tuple(sorted(set(levels)))

    def check(self, request: MemoryRequest, policy: KeyPolicy | None) -> None:
        """Raise `MemoryRequestError` (400) or `MemoryForbiddenError` (403) before any work."""
        if request.path is not None:
            self.check_path(request.path)
            if request.mode != "auto":
                raise MemoryRequestError(
                    f"memory.path needs memory.mode 'auto', not {request.mode!r}",
                    param="memory.path",
                )
        if request.levels is not None:
            self.check_levels(request.levels)
        if policy is None:
            return
        if request.mode not in policy.modes:
            raise MemoryForbiddenError(
                f"this API key may not use memory mode {request.mode!r} "
                f"(allowed: {', '.join(policy.modes)})",
                param="memory.mode",
                code="memory_mode_forbidden",
            )
        if request.path is not None and not policy.explicit_path:
            raise MemoryForbiddenError(
                "this API key may not name a memory path",
                param="memory.path",
                code="memory_path_forbidden",
            )

    # -- resolution -----------------------------------------------------------------------------

    def _degrade(self, out: ResolvedMemory, level: int, reason: Reason) -> None:
        """Record that `level` cannot be used and apply its fallback (generic, or nothing)."""
        if self.fallback == "generic" and level in self.generic:
            out.blocks.append(self.generic[level])
            out.degraded.append(Degraded(level, reason, "generic"))
        else:
            out.degraded.append(Degraded(level, reason, "none"))

    async def resolve(
        self, text: str, request: MemoryRequest, policy: KeyPolicy | None = None
    ) -> ResolvedMemory:
        """The blocks for `text` under `request` (already `check`ed) and the key's `policy`."""
        self.check(request, policy)
        if request.mode == "off" or not self.levels:
            return ResolvedMemory(mode=request.mode, path=None, node_ids=None, blocks=[])
        wanted = set(self.levels if request.levels is None else request.levels)
        if request.mode == "generic":
            blocks = [self.generic[lv] for lv in self.levels if lv in wanted and lv in self.generic]
            return ResolvedMemory(mode="generic", path=None, node_ids=None, blocks=blocks)
        started = time.perf_counter()
        if request.path is not None:
            path = tuple(request.path)
            nodes = self.node_ids(path)
        else:
            path, nodes, _ = await self.route(text)
        allowed = set(self.levels if policy is None or policy.levels is None else policy.levels)
        blocked = set(self.blocklist.blocked_levels(nodes))
        # A key limited to some levels is shown the path only down to the deepest of them: the
        # deeper entries would tell it which clusters it may not read its text falls in.
        shown = path[: max(allowed, default=0)]
        out = ResolvedMemory(mode="auto", path=shown, node_ids=nodes, blocks=[])
        to_fetch: list[int] = []
        for level in self.levels:
            if level not in wanted:
                continue  # the request left it out: nothing, and nothing to report
            reason: Literal["blocked", "disabled"] | None = None
            if level not in allowed:
                reason = "disabled"  # before "blocked": whether it is blocked is not its to know
            elif level in blocked:
                reason = "blocked"
                out.blocked.append(level)
            if reason is None:
                to_fetch.append(level)
                continue
            self._degrade(out, level, reason)
        keys = [BlockKey(self.bank_id, level, nodes[level - 1]) for level in to_fetch]
        fetched = await self.store.fetch_many(keys, deadline_s=self.deadline_s)
        for level, got in zip(to_fetch, fetched, strict=True):
            if got.value is not None and self.blocklist.covers(level, nodes[level - 1]):
                # Blocked while the fetch was in flight: never applied, not kept in RAM, and
                # reported as blocked only (not as a block that was served).
                self.store.evict(got.key)
                out.blocked.append(level)
                self._degrade(out, level, "blocked")
                continue
            out.reports.append(BlockReport.of(level, nodes[level - 1], got))
            if got.value is not None:
                out.blocks.append(got.value)
                continue
            self._degrade(out, level, _failure(got.error))
        out.degraded.sort(key=lambda d: d.level)
        out.blocked.sort()
        out.fetch_ms = (time.perf_counter() - started) * 1e3
        return out

    # -- admin ----------------------------------------------------------------------------------

    async def prefetch(self, path: Sequence[int]) -> list[BlockReport | Degraded]:
        """Load a path's unblocked blocks into the cache; what happened per level."""
        nodes = self.node_ids(self.check_path(path))
        blocked = set(self.blocklist.blocked_levels(nodes))
        out: list[BlockReport | Degraded] = []
        levels = [level for level in self.levels if level not in blocked]
        out += [Degraded(level, "blocked", "none") for level in self.levels if level in blocked]
        keys = [BlockKey(self.bank_id, level, nodes[level - 1]) for level in levels]
        for level, got in zip(levels, await self.store.fetch_many(keys), strict=True):
            if got.value is not None and self.blocklist.covers(level, nodes[level - 1]):
                self.store.evict(got.key)  # blocked while in flight: not kept
                out.append(Degraded(level, "blocked", "none"))
            elif got.value is None:
                out.append(Degraded(level, _failure(got.error), "none"))
            else:
                out.append(BlockReport.of(level, nodes[level - 1], got))
        return sorted(out, key=lambda r: r.level)

    def evict_blocked(self) -> int:
        """Drop every blocked block from the RAM cache; how many were dropped."""
        dropped = 0
        for skey in self.store.cached_keys():
            key = BlockKey.parse(skey)
            if key.bank_id == self.bank_id and self.blocklist.covers(key.level, key.node):
                dropped += self.store.evict(key)
        return dropped

    def residency(self) -> dict[int, list[int]]:
        """The nodes of each memory level held in the RAM cache."""
        out: dict[int, list[int]] = {level: [] for level in self.levels}
        for skey in self.store.cached_keys():
            key = BlockKey.parse(skey)
            if key.bank_id == self.bank_id and key.level in out:
                out[key.level].append(key.node)
        return {level: sorted(nodes) for level, nodes in out.items()}
