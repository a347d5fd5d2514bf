"""`CappedTier`: a tier used as a cache, held under a byte cap by evicting least-recently-used.

A disk or LMDB tier in front of a slower home (a local copy of cloud blocks, say) must never grow
past its cap. The wrapper keeps an index of what the tier holds (rebuilt from `scan()` at
`open()`, so a restart neither forgets nor double-counts), counts every put, and deletes the
least-recently-read blocks before a put would cross the cap. A block larger than the cap is
not written at all.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from tiers.base import Buffer, Consume, T, Tier, TierWrapper


class CappedTier(TierWrapper):
    def __init__(self, inner: Tier, cap_bytes: int) -> None:
        if cap_bytes < 0:
            raise ValueError(f"tier {inner.name!r}: cap must be >= 0 bytes, got {cap_bytes}")
        super().__init__(inner)
        self.cap_bytes = cap_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = asyncio.Lock()  # serialises the accounting of puts and evictions
        self.evictions = 0
        self.evicted_bytes = 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    async def open(self) -> None:
        """Index what the tier already holds, then evict down to the cap if it is over."""
        async with self._lock:
            self._sizes = OrderedDict(await self.inner.scan())
            self._bytes = sum(self._sizes.values())
            await self._evict_until(self.cap_bytes)

    async def _evict_until(self, target: int) -> None:
        while self._bytes > target and self._sizes:
            key, size = self._sizes.popitem(last=False)
            self._bytes -= size
            await self.inner.delete(key)
            self.evictions += 1
            self.evicted_bytes += size

    async def read(self, key: str, consume: Consume[T]) -> T | None:
        result = await self.inner.read(key, consume)
        if key in self._sizes:
            self._sizes.move_to_end(key)
        return result

    async def put(self, key: str, data: Buffer) -> None:
        size = memoryview(data).nbytes
        if size > self.cap_bytes:
            return
        async with self._lock:
            old = self._sizes.pop(key, 0)
            self._bytes -= old
            await self._evict_until(self.cap_bytes - size)
            await self.inner.put(key, data)
            self._sizes[key] = size
            self._bytes += size

    async def delete(self, key: str) -> bool:
        async with self._lock:
            self._bytes -= self._sizes.pop(key, 0)
            return await self.inner.delete(key)
