"""TieredStore read path: read-through, promotion, single-flight, verification, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tests.conftest import S3_CREDENTIALS, S3Server
from tests.tiers.helpers import digests_of, make_blocks, metric, seed_homes, tier_reads
from tiers import (
    BlockKey,
    BlockNotFoundError,
    BytesCodec,
    StoreConfig,
    TieredStore,
    build_store,
)

BLOCKS = make_blocks({1: 2, 2: 4, 3: 8})


def three_tier_config(
    tmp_path: Path,
    s3: S3Server,
    bucket: str,
    extra_tiers: dict[str, object] | None = None,
    **extra: object,
) -> StoreConfig:
    return StoreConfig.model_validate(
        {
            "tiers": {
                **(extra_tiers or {}),
                "flash": {"kind": "lmdb", "path": tmp_path / "flash", "map_size": "1GiB"},
                "disk": {"kind": "disk", "root": tmp_path / "disk"},
                "cloud": {
                    "kind": "s3",
                    "bucket": bucket,
                    "endpoint_url": s3.endpoint_url,
                    "region": "us-east-1",
                    **S3_CREDENTIALS,
                },
            },
            "placement": {1: "flash", 2: "disk", 3: "cloud"},
            "ram_cache": "64MiB",
            **extra,
        }
    )


@pytest.fixture
async def store(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> AsyncIterator[TieredStore[bytes]]:
    cfg = three_tier_config(tmp_path, s3_server, s3_bucket)
    s = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    await s.tiers["cloud"].create_bucket()  # type: ignore[attr-defined]
    await seed_homes(s, BLOCKS)
    yield s
    await s.aclose()


async def test_a_path_is_fetched_from_every_home_tier_then_from_ram(
    store: TieredStore[bytes],
) -> None:
    path = [BlockKey("bank", 1, 1), BlockKey("bank", 2, 3), BlockKey("bank", 3, 6)]
    first = await store.fetch_many(path)
    assert [f.tier for f in first] == ["flash", "disk", "cloud"]
    assert [f.value for f in first] == [BLOCKS[k] for k in path]
    assert not any(f.cached for f in first)

    again = await store.fetch_many(path)
    assert [f.tier for f in again] == ["ram", "ram", "ram"]
    assert all(f.cached for f in again)
    assert [f.value for f in again] == [BLOCKS[k] for k in path]
    assert store.cache_stats().hits == 3


async def test_metrics_show_reads_bytes_and_cache(store: TieredStore[bytes]) -> None:
    key = BlockKey("bank", 3, 2)
    await store.fetch(key)
    await store.fetch(key)
    reg = store.metrics.registry
    assert metric(reg, "hmem_tier_reads_total", tier="cloud", level="3", result="hit") == 1
    assert metric(reg, "hmem_tier_read_bytes_total", tier="cloud", level="3") == len(BLOCKS[key])
    assert metric(reg, "hmem_block_fetches_total", level="3", outcome="cached") == 1
    assert metric(reg, "hmem_cache_bytes", cache="ram") == len(BLOCKS[key])
    assert metric(reg, "hmem_tier_breaker_state", tier="cloud") == 0
    text = generate_latest(reg).decode()
    assert 'hmem_tier_read_seconds_bucket{le="0.1",level="3",tier="cloud"}' in text
    assert "hmem_cache_evictions_total" in text


async def test_64_concurrent_gets_of_one_block_read_its_tier_once(
    store: TieredStore[bytes],
) -> None:
    key = BlockKey("bank", 3, 5)
    results = await asyncio.gather(*(store.fetch(key) for _ in range(64)))
    assert all(r.value == BLOCKS[key] for r in results)
    assert tier_reads(store, "cloud") == 1
    assert store.cache_stats().shared_loads == 63


async def test_64_concurrent_gets_of_a_block_missing_everywhere_read_once(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    cfg = three_tier_config(tmp_path, s3_server, s3_bucket)
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        await store.tiers["cloud"].create_bucket()  # type: ignore[attr-defined]
        key = BlockKey("bank", 3, 7)  # in the manifest, never pushed
        results = await asyncio.gather(*(store.fetch(key) for _ in range(64)))
        assert all(isinstance(r.error, BlockNotFoundError) for r in results)
        assert tier_reads(store, "cloud", "miss") == 1
    finally:
        await store.aclose()


async def test_a_key_outside_the_manifest_reads_no_tier(store: TieredStore[bytes]) -> None:
    fetched = await store.fetch(BlockKey("bank", 2, 99))
    assert isinstance(fetched.error, BlockNotFoundError)
    assert tier_reads(store, "disk") == 0


async def test_failed_fetch_is_not_cached_and_succeeds_once_the_block_exists(
    store: TieredStore[bytes],
) -> None:
    key = BlockKey("bank", 2, 1)
    await store.tiers["disk"].delete(store.storage_name(key))
    assert isinstance((await store.fetch(key)).error, BlockNotFoundError)
    await store.tiers["disk"].put(store.storage_name(key), BLOCKS[key])
    fetched = await store.fetch(key)
    assert fetched.ok
    assert fetched.value == BLOCKS[key]


async def test_cache_tier_is_filled_by_promotion_and_read_before_the_home(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    local = {"kind": "disk", "root": tmp_path / "local", "cap": "1MiB"}
    cfg = three_tier_config(
        tmp_path, s3_server, s3_bucket, {"local": local}, cache_tiers=["local"], ram_cache=0
    )
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        await store.tiers["cloud"].create_bucket()  # type: ignore[attr-defined]
        await seed_homes(store, BLOCKS)
        key = BlockKey("bank", 3, 4)
        assert (await store.fetch(key)).tier == "cloud"
        await store.drain()
        assert await store.tiers["local"].get(store.storage_name(key)) == BLOCKS[key]
        assert (await store.fetch(key)).tier == "local"
        assert tier_reads(store, "cloud") == 1
    finally:
        await store.aclose()


async def test_pinned_level_survives_pressure(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    cfg = three_tier_config(tmp_path, s3_server, s3_bucket, ram_cache=4096 * 4, pin_levels=[1])
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        await store.tiers["cloud"].create_bucket()  # type: ignore[attr-defined]
        await seed_homes(store, BLOCKS)
        await store.fetch_many([BlockKey("bank", 1, 0), BlockKey("bank", 1, 1)])
        await store.fetch_many([BlockKey("bank", 3, n) for n in range(8)])
        stats = store.cache_stats()
        assert stats.evictions >= 6
        assert stats.bytes <= stats.capacity_bytes
        # Pinned: still held after the pressure evicted six level-3 blocks.
        assert {"bank/L1/0", "bank/L1/1"} <= set(store.cached_keys())
    finally:
        await store.aclose()


async def test_store_get_raises_the_error_of_a_failed_fetch(store: TieredStore[bytes]) -> None:
    assert await store.get(BlockKey("bank", 1, 0)) == BLOCKS[BlockKey("bank", 1, 0)]
    with pytest.raises(BlockNotFoundError):
        await store.get(BlockKey("bank", 1, 5))
