"""Helpers for store tests: blocks with their manifest digests, metric values, and fault
wrappers around real tiers (a tier that hangs, a tier that says it is read-only)."""

from __future__ import annotations

import asyncio
import hashlib

from prometheus_client import CollectorRegistry

from tests.tiers.conftest import blob
from tiers import BlockDigest, BlockKey, Tier, TieredStore, TierWrapper
from tiers.base import Consume, T


def make_blocks(
    spec: dict[int, int], *, nbytes: int = 4096, bank: str = "bank"
) -> dict[BlockKey, bytes]:
    """`{level: n_nodes}` -> distinct blocks for every node of every level."""
    return {
        BlockKey(bank, level, node): blob(nbytes, seed=level * 1000 + node)
        for level, n in spec.items()
        for node in range(n)
    }


def digests_of(blocks: dict[BlockKey, bytes]) -> dict[str, BlockDigest]:
    return {str(k): BlockDigest(len(v), hashlib.sha256(v).hexdigest()) for k, v in blocks.items()}


async def seed_homes(store: TieredStore[bytes], blocks: dict[BlockKey, bytes]) -> None:
    """Write each block to its level's home tier under its content name, as `hmem bank push`
    would."""
    for key, data in blocks.items():
        await store.tiers[store.placement[key.level][0]].put(store.storage_name(key), data)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The value of one sample (0 when the series does not exist yet)."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def tier_reads(store: TieredStore[bytes], tier: str, result: str | None = None) -> float:
    """Reads sent to `tier` (of one result, or all), summed over levels."""
    total = 0.0
    for family in store.metrics.registry.collect():
        for sample in family.samples:
            if sample.name != "hmem_tier_reads_total" or sample.labels["tier"] != tier:
                continue
            if result is None or sample.labels["result"] == result:
                total += sample.value
    return total


class HangingTier(TierWrapper):
    """A real tier whose reads hang (as on an endpoint that stopped answering) until `release()`.

    Counts reads started and reads cancelled while hanging.
    """

    def __init__(self, inner: Tier) -> None:
        super().__init__(inner)
        self._released = asyncio.Event()
        self.started = 0
        self.cancelled = 0

    def hang(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def read(self, key: str, consume: Consume[T]) -> T | None:
        self.started += 1
        try:
            await self._released.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await self.inner.read(key, consume)


class ReadOnlyTier(TierWrapper):
    """A real tier that declares itself read-only, as the bank's origin does."""

    read_only = True
