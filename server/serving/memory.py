"""`MemoryService`: the memory and operations side of serving, one call per admin API.

It owns routing a text, prefetching a path, blocking a subtree (and evicting it from the RAM
cache in the same call, so no caller can forget the second step), unblocking, the blocklist,
which blocks are resident, the cache's statistics and the tiers' health: each through the
resolver, the blocklist and the store's public interface, never the store's parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.blocklist import Blocklist, BlocklistError
from server.engine.memory import BlockReport, Degraded, MemoryRequestError, MemoryResolver
from server.model.memory import MemoryBlock
from server.serving.errors import RequestError
from tiers import TieredStore


@dataclass(frozen=True, slots=True)
class Route:
    path: tuple[int, ...]
    node_ids: tuple[int, ...]
    distances: list[float]
    blocked: list[int]  # levels of the path the blocklist covers


@dataclass(frozen=True, slots=True)
class CacheView:
    resident: dict[int, list[int]]  # level -> node ids held in the RAM cache
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int


class MemoryService:
    """Routing, prefetch, the blocklist and residency over one resolver and store."""

    def __init__(
        self,
        *,
        resolver: MemoryResolver,
        blocklist: Blocklist,
        store: TieredStore[MemoryBlock],
    ) -> None:
        self.resolver = resolver
        self.blocklist = blocklist
        self.store = store

    async def route(self, text: str) -> Route:
        path, nodes, distances = await self.resolver.route(text)
        return Route(path, nodes, distances, self.blocklist.blocked_levels(nodes))

    async def prefetch(self, path: Sequence[int]) -> list[BlockReport | Degraded]:
        """Load a path's unblocked blocks into the RAM cache; what happened per level."""
        try:
            return await self.resolver.prefetch(path)
        except MemoryRequestError as exc:
            raise RequestError(str(exc), param="path", code=exc.code) from None

    def block(self, level: int, node: int) -> bool:
        """Block a subtree and evict its blocks from the RAM cache; whether it was new."""
        changed = self._change(level, node, block=True)
        self.resolver.evict_blocked()
        return changed

    def unblock(self, level: int, node: int) -> bool:
        return self._change(level, node, block=False)

    def _change(self, level: int, node: int, *, block: bool) -> bool:
        try:
            if block:
                return self.blocklist.block(level, node)
            return self.blocklist.unblock(level, node)
        except BlocklistError as exc:
            raise RequestError(str(exc), param="node", code="invalid_cluster") from None

    def blocked(self) -> list[tuple[int, int]]:
        """The blocklist's (level, node) entries."""
        return self.blocklist.entries()

    def residency(self) -> dict[int, list[int]]:
        """The nodes of each memory level held in the RAM cache."""
        return self.resolver.residency()

    def cache(self) -> CacheView:
        stats = self.store.cache_stats()
        return CacheView(
            resident=self.residency(),
            bytes=stats.bytes,
            capacity_bytes=stats.capacity_bytes,
            hits=stats.hits,
            misses=stats.misses,
        )

    def tier_states(self) -> dict[str, str]:
        """Each tier's circuit breaker: "closed", "open" or "half_open"."""
        return {name: state.name.lower() for name, state in self.store.breaker_states().items()}

    def corrupt_blocks(self) -> dict[str, int]:
        """Per level, blocks whose last load found no good copy in any tier."""
        unrepaired = self.store.unrepaired()
        return {str(level): len(keys) for level, keys in sorted(unrepaired.items()) if keys}
