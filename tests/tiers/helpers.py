"""Helpers for store tests: blocks with their manifest digests, and reading metric values."""

from __future__ import annotations

import hashlib

from prometheus_client import CollectorRegistry

from tests.tiers.conftest import blob
from tiers import BlockDigest, BlockKey, TieredStore


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
    """Write each block to its level's home tier, as `hmem bank push` would."""
    for key, data in blocks.items():
        await store.tiers[store.placement[key.level][0]].put(str(key), data)


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
