"""`BlockCache`: the RAM tier, a byte-budgeted cache of decoded blocks with single-flight loads.

Eviction is GreedyDual-Size-Frequency: each entry's priority is
`clock + hits * refetch_cost_s * level_weight / nbytes`, the expected seconds of refetching saved
per byte of RAM kept. A block whose home is slow (cloud) or that many prompts share (shallow
levels are hit more often) stays; a large block that is cheap to refetch from flash goes first.
The clock rises to each evicted priority, so entries that stop being used age out.

Pinned entries (a key, or every block of a pinned level) are never evicted but count against the
budget. A value larger than what the unpinned budget can hold is returned to its caller and not
cached. Concurrent `get_or_load` calls for one key share one load (single-flight); the load
runs as a task the cache owns, so a caller that gives up (deadline) does not cancel it for the
others, and a late block still lands in the cache for the next prompt.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")
_MIN_COST_S = 1e-6


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    nbytes: int
    level: int
    cost_s: float
    hits: int
    priority: float
    pinned: bool


@dataclass(frozen=True, slots=True)
class CacheStats:
    capacity_bytes: int
    bytes: int
    pinned_bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    evicted_bytes: int
    rejected: int
    loads: int
    shared_loads: int


class BlockCache(Generic[V]):
    """A RAM cache of decoded values keyed by block key, bounded in bytes."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        pinned_levels: Iterable[int] = (),
        level_weights: Mapping[int, float] | None = None,
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._pinned_levels = set(pinned_levels)
        self._pinned_keys: set[str] = set()
        self._level_weights = dict(level_weights or {})
        self._entries: dict[str, _Entry[V]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._clock = 0.0
        self._bytes = 0
        self._pinned_bytes = 0
        self._inflight: dict[str, asyncio.Task[tuple[V, int]]] = {}
        self._hits = self._misses = self._evictions = self._evicted_bytes = 0
        self._rejected = self._loads = self._shared_loads = 0

    # -- lookups --------------------------------------------------------------------------------

    def get(self, key: str) -> V | None:
        """The cached value, counting a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._hits += 1
        entry.hits += 1
        self._reprioritise(key, entry)
        return entry.value

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def is_pinned(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.pinned

    # -- inserts and eviction -------------------------------------------------------------------

    def put(self, key: str, value: V, *, nbytes: int, level: int, cost_s: float) -> bool:
        """Cache `value`, evicting as needed. False when it cannot fit (it is then not cached)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self.discard(key)
        pinned = key in self._pinned_keys or level in self._pinned_levels
        if nbytes > self.capacity_bytes - self._pinned_bytes:
            self._rejected += 1
            return False
        self._evict_until(self.capacity_bytes - nbytes)
        entry = _Entry(value, nbytes, level, max(cost_s, _MIN_COST_S), 1, 0.0, pinned)
        self._entries[key] = entry
        self._bytes += nbytes
        if pinned:
            self._pinned_bytes += nbytes
        self._reprioritise(key, entry)
        return True

    def discard(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.nbytes
        if entry.pinned:
            self._pinned_bytes -= entry.nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._heap.clear()
        self._bytes = self._pinned_bytes = 0

    def _priority(self, entry: _Entry[V]) -> float:
        weight = self._level_weights.get(entry.level, 1.0)
        return self._clock + entry.hits * entry.cost_s * weight / max(entry.nbytes, 1)

    def _reprioritise(self, key: str, entry: _Entry[V]) -> None:
        if entry.pinned:
            return
        entry.priority = self._priority(entry)
        heapq.heappush(self._heap, (entry.priority, next(self._seq), key))
        if len(self._heap) > 4 * len(self._entries) + 64:
            self._heap = [
                (e.priority, next(self._seq), k) for k, e in self._entries.items() if not e.pinned
            ]
            heapq.heapify(self._heap)

    def _evict_until(self, target_bytes: int) -> None:
        while self._bytes > target_bytes and self._heap:
            priority, _, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry.pinned or entry.priority != priority:
                continue  # stale heap record: the entry was re-prioritised, pinned or removed
            self._clock = priority
            self.discard(key)
            self._evictions += 1
            self._evicted_bytes += entry.nbytes

    # -- pinning --------------------------------------------------------------------------------

    def pin(self, key: str) -> None:
        """Never evict `key` (now, or once it is loaded)."""
        self._pinned_keys.add(key)
        entry = self._entries.get(key)
        if entry is not None and not entry.pinned:
            entry.pinned = True
            self._pinned_bytes += entry.nbytes

    def unpin(self, key: str) -> None:
        self._pinned_keys.discard(key)
        entry = self._entries.get(key)
        if entry is not None and entry.pinned and entry.level not in self._pinned_levels:
            entry.pinned = False
            self._pinned_bytes -= entry.nbytes
            self._reprioritise(key, entry)
            self._evict_until(self.capacity_bytes)

    # -- single-flight loads --------------------------------------------------------------------

    async def get_or_load(
        self,
        key: str,
        load: Callable[[], Awaitable[tuple[V, int]]],
        *,
        level: int,
        cost_s: float,
    ) -> tuple[V, bool]:
        """The cached value, or the result of one shared `load()` (value, nbytes), cached.

        Returns `(value, was_cached)`. A caller cancelled while waiting does not cancel the load.
        """
        value = self.get(key)
        if value is not None:
            return value, True
        task = self._inflight.get(key)
        if task is None:
            self._loads += 1
            task = asyncio.create_task(self._load(key, load, level, cost_s), name=f"load:{key}")
            self._inflight[key] = task
            task.add_done_callback(self._load_done(key))
        else:
            self._shared_loads += 1
        loaded, _ = await asyncio.shield(task)
        return loaded, False

    async def _load(
        self, key: str, load: Callable[[], Awaitable[tuple[V, int]]], level: int, cost_s: float
    ) -> tuple[V, int]:
        value, nbytes = await load()
        self.put(key, value, nbytes=nbytes, level=level, cost_s=cost_s)
        return value, nbytes

    def _load_done(self, key: str) -> Callable[[asyncio.Task[tuple[V, int]]], None]:
        def done(task: asyncio.Task[tuple[V, int]]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            if not task.cancelled():
                task.exception()  # retrieved: every waiter may have left on its deadline

        return done

    def inflight(self) -> int:
        return len(self._inflight)

    async def aclose(self) -> None:
        """Cancel the loads in flight and wait for them to finish."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()

    # -- stats ----------------------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def stats(self) -> CacheStats:
        return CacheStats(
            capacity_bytes=self.capacity_bytes,
            bytes=self._bytes,
            pinned_bytes=self._pinned_bytes,
            entries=len(self._entries),
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            evicted_bytes=self._evicted_bytes,
            rejected=self._rejected,
            loads=self._loads,
            shared_loads=self._shared_loads,
        )
