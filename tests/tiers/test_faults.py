"""Real faults: the S3 server going away, a tier slower than the deadline, corrupt blocks,
caches at their byte cap, and hostile keys."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import S3_CREDENTIALS, S3Server, free_port
from tests.tiers.conftest import blob
from tests.tiers.helpers import digests_of, make_blocks, seed_homes, tier_reads
from tiers import (
    BlockCache,
    BlockKey,
    BreakerState,
    BytesCodec,
    CappedTier,
    DiskTier,
    FetchFailedError,
    FetchTimeoutError,
    IntegrityError,
    InvalidKeyError,
    LmdbTier,
    S3Tier,
    StoreConfig,
    TierFullError,
    TierUnavailableError,
    build_store,
)
from tiers.disk import SUFFIX

BLOCKS = make_blocks({1: 2, 2: 4, 3: 8})


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    """An S3 server this test alone may stop."""
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
async def test_s3_outage_fetches_meet_deadline_breaker_opens_then_closes(
    tmp_path: Path, own_s3: S3Server
) -> None:
    cfg = StoreConfig.model_validate(
        {
            "tiers": {
                "disk": {"kind": "disk", "root": tmp_path / "disk"},
                "cloud": {
                    "kind": "s3",
                    "bucket": "outage",
                    "endpoint_url": own_s3.endpoint_url,
                    "region": "us-east-1",
                    "connect_timeout_s": 0.2,
                    "read_timeout_s": 0.5,
                    "max_attempts": 1,
                    **S3_CREDENTIALS,
                },
            },
            "placement": {1: "disk", 2: "disk", 3: "cloud"},
            "ram_cache": 0,  # every fetch goes to its tier
            "deadline_s": 0.5,
            "breaker_failures": 3,
            "breaker_reset_s": 0.5,
            "failure_ttl_s": 0.2,
        }
    )
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        await store.tiers["cloud"].create_bucket()  # type: ignore[attr-defined]
        await seed_homes(store, BLOCKS)
        assert (await store.fetch(BlockKey("bank", 3, 0))).tier == "cloud"

        own_s3.stop()
        deep = [BlockKey("bank", 3, n) for n in range(8)]
        for key in deep:
            started = time.perf_counter()
            fetched = await store.fetch(key)
            assert time.perf_counter() - started < 0.5 + 0.25
            assert fetched.error is not None
        assert store.breaker("cloud").state is BreakerState.OPEN
        assert tier_reads(store, "cloud", "skipped") >= 1  # refused by the breaker, not sent
        # The other levels are untouched by the cloud's outage.
        assert (await store.fetch(BlockKey("bank", 2, 1))).ok

        own_s3.start()
        await asyncio.sleep(0.6)  # past breaker_reset_s: the next read is the probe
        assert store.breaker("cloud").state is BreakerState.HALF_OPEN
        fetched = await store.fetch(BlockKey("bank", 3, 7))
        assert fetched.ok
        assert fetched.value == BLOCKS[BlockKey("bank", 3, 7)]
        assert store.breaker("cloud").state is BreakerState.CLOSED
    finally:
        await store.aclose()


async def test_a_tier_slower_than_the_deadline_times_out_and_the_late_block_lands(
    tmp_path: Path,
) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text("[sluggish]\nlatency_ms = 400\nbandwidth_mb_s = 1000\n")
    cfg = StoreConfig.model_validate(
        {
            "tiers": {"slow": {"kind": "disk", "root": tmp_path / "slow", "profile": "sluggish"}},
            "placement": {1: "slow", 2: "slow", 3: "slow"},
            "deadline_s": 0.1,
            "tier_timeout_s": 2.0,  # the tier read itself may finish after the caller left
            "profiles_file": profiles,
        }
    )
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        await seed_homes(store, BLOCKS)
        key = BlockKey("bank", 2, 2)
        started = time.perf_counter()
        fetched = await store.fetch(key)
        assert time.perf_counter() - started < 0.35
        assert isinstance(fetched.error, FetchTimeoutError)

        await asyncio.sleep(0.5)  # the shared load finishes in the background ...
        again = await store.fetch(key)
        assert again.cached  # ... and the next prompt finds the block in RAM
        assert again.value == BLOCKS[key]
    finally:
        await store.aclose()


def flip_a_byte(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_corrupt_block_on_disk_is_detected_counted_and_never_returned(
    tmp_path: Path,
) -> None:
    cfg = StoreConfig.model_validate(
        {
            "tiers": {"disk": {"kind": "disk", "root": tmp_path / "disk"}},
            "placement": {1: "disk", 2: "disk", 3: "disk"},
        }
    )
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        await seed_homes(store, BLOCKS)
        key = BlockKey("bank", 2, 0)
        flip_a_byte(tmp_path / "disk" / (store.storage_name(key) + SUFFIX))
        fetched = await store.fetch(key)
        assert fetched.value is None
        assert isinstance(fetched.error, FetchFailedError)
        assert isinstance(fetched.error.causes[0], IntegrityError)
        assert tier_reads(store, "disk", "corrupt") == 1
        assert key not in store.cached_keys()  # a corrupt block is never cached either
    finally:
        await store.aclose()


async def test_corrupt_block_in_lmdb_falls_through_to_a_good_replica_and_is_repaired(
    tmp_path: Path,
) -> None:
    cfg = StoreConfig.model_validate(
        {
            "tiers": {
                "flash": {"kind": "lmdb", "path": tmp_path / "flash", "map_size": "256MiB"},
                "disk": {"kind": "disk", "root": tmp_path / "disk"},
            },
            "placement": {1: ["flash", "disk"], 2: "disk", 3: "disk"},
        }
    )
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        await seed_homes(store, BLOCKS)
        key = BlockKey("bank", 1, 1)
        await store.tiers["disk"].put(store.storage_name(key), BLOCKS[key])  # the replica
        good = BLOCKS[key]
        await store.tiers["flash"].put(
            store.storage_name(key), good[:50] + bytes([good[50] ^ 1]) + good[51:]
        )

        fetched = await store.fetch(key)
        assert fetched.value == good
        assert fetched.tier == "disk"
        assert tier_reads(store, "flash", "corrupt") == 1
        await store.drain()
        assert (
            await store.tiers["flash"].get(store.storage_name(key)) == good
        )  # repaired from the replica
    finally:
        await store.aclose()


async def test_truncated_block_is_rejected(tmp_path: Path) -> None:
    cfg = StoreConfig.model_validate(
        {"tiers": {"flash": {"kind": "lmdb", "path": tmp_path / "f"}}, "placement": {3: "flash"}}
    )
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        key = BlockKey("bank", 3, 3)
        await store.tiers["flash"].put(store.storage_name(key), BLOCKS[key][:-1])
        fetched = await store.fetch(key)
        assert isinstance(fetched.error, FetchFailedError)
        assert "bytes, expected" in str(fetched.error)
    finally:
        await store.aclose()


def test_ram_cache_at_its_byte_cap_evicts_to_stay_under() -> None:
    cache: BlockCache[bytes] = BlockCache(10_000)
    for i in range(100):
        size = 500 + (i * 37) % 2000
        cache.put(f"b/L3/{i}", b"x" * size, nbytes=size, level=3, cost_s=0.01)
        assert cache.held_bytes <= 10_000
    stats = cache.stats()
    assert stats.evictions > 0
    sizes = [500 + (int(k.rsplit("/", 1)[1]) * 37) % 2000 for k in cache.keys()]  # noqa: SIM118
    assert stats.bytes == sum(sizes)


def disk_usage(root: Path) -> int:
    return sum(os.path.getsize(p) for p in root.rglob(f"*{SUFFIX}"))


async def test_capped_disk_cache_stays_under_its_cap_across_restarts(tmp_path: Path) -> None:
    tier = CappedTier(DiskTier(tmp_path / "cache"), cap_bytes=100_000)
    await tier.open()
    for i in range(30):
        await tier.put(f"bank/L3/{i}", blob(10_000, seed=i))
        assert tier.held_bytes <= 100_000
    assert disk_usage(tmp_path / "cache") == tier.held_bytes <= 100_000
    assert await tier.get("bank/L3/29") == blob(10_000, seed=29)  # newest kept
    assert await tier.get("bank/L3/0") is None  # oldest evicted
    await tier.aclose()

    smaller = CappedTier(DiskTier(tmp_path / "cache"), cap_bytes=30_000)
    await smaller.open()  # the index is rebuilt from disk and the new cap enforced
    assert disk_usage(tmp_path / "cache") == smaller.held_bytes <= 30_000
    await smaller.aclose()


@pytest.mark.parametrize(
    "key", ["../../etc/passwd", "/etc/passwd", "", "bank/L1/../../x", "bank/L1/0\x00"]
)
def test_hostile_keys_are_rejected_with_a_clear_error(key: str) -> None:
    with pytest.raises(InvalidKeyError, match="key"):
        BlockKey.parse(key)


def test_block_key_fields_are_validated() -> None:
    with pytest.raises(InvalidKeyError, match="bank id"):
        BlockKey("../x", 1, 0)
    with pytest.raises(InvalidKeyError, match="level"):
        BlockKey("bank", 0, 0)
    with pytest.raises(InvalidKeyError, match="node"):
        BlockKey("bank", 1, -1)
    assert BlockKey.parse("bank/L2/17") == BlockKey("bank", 2, 17)
    assert str(BlockKey("bank", 2, 17)) == "bank/L2/17"


async def test_disk_tier_never_writes_outside_its_root(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "root")
    with pytest.raises(InvalidKeyError):
        await tier.put("../escape", b"x")
    assert not (tmp_path / "escape.blk").exists()
    await tier.aclose()


async def test_lmdb_backend_errors_are_tier_errors(tmp_path: Path) -> None:
    writer = LmdbTier(tmp_path / "flash", map_size=1 << 20)
    await writer.put("bank/L1/0", b"x")
    await writer.aclose()
    reader = LmdbTier(tmp_path / "flash", map_size=1 << 20, readonly=True)
    assert await reader.get("bank/L1/0") == b"x"
    for call in (reader.put("bank/L1/1", b"y"), reader.delete("bank/L1/0")):
        with pytest.raises(TierUnavailableError):
            await call
    await reader.aclose()


async def test_a_full_lmdb_map_says_what_to_raise(tmp_path: Path) -> None:
    tier = LmdbTier(tmp_path / "flash", map_size=1 << 20)
    with pytest.raises(TierFullError, match="map_size"):
        await tier.put("bank/L1/0", b"x" * (2 << 20))
    await tier.aclose()


async def test_a_failure_is_remembered_briefly_then_the_tier_is_asked_again(
    tmp_path: Path, s3_server: S3Server
) -> None:
    cfg = StoreConfig.model_validate(
        {
            "tiers": {
                "cloud": {
                    "kind": "s3",
                    "bucket": "created-later",
                    "endpoint_url": s3_server.endpoint_url,
                    "region": "us-east-1",
                    "max_attempts": 1,
                    **S3_CREDENTIALS,
                }
            },
            "placement": {3: "cloud"},
            "failure_ttl_s": 0.3,
            "breaker_failures": 100,  # keep the breaker out of this test
        }
    )
    store = await build_store(cfg, codec=BytesCodec(), digests=digests_of(BLOCKS))
    try:
        key = BlockKey("bank", 3, 1)
        assert isinstance((await store.fetch(key)).error, FetchFailedError)  # no bucket yet
        assert tier_reads(store, "cloud", "error") == 1

        await store.tiers["cloud"].create_bucket()  # type: ignore[attr-defined]
        await store.tiers["cloud"].put(store.storage_name(key), BLOCKS[key])
        assert (await store.fetch(key)).error is not None  # within the TTL: not asked again
        assert tier_reads(store, "cloud", "skipped") == 1

        await asyncio.sleep(0.35)
        fetched = await store.fetch(key)
        assert fetched.value == BLOCKS[key]
    finally:
        await store.aclose()


class RejectingCodec:
    """A bank decoder that refuses what it reads (as a codec does for a badly built bank)."""

    def decode(self, view: memoryview) -> bytes:
        raise ValueError("tensor 'gate' has the wrong shape")

    def nbytes(self, value: bytes) -> int:
        return len(value)


async def test_verified_bytes_that_do_not_decode_are_a_failed_fetch_not_a_crash(
    tmp_path: Path,
) -> None:
    cfg = StoreConfig.model_validate(
        {"tiers": {"d": {"kind": "disk", "root": tmp_path / "d"}}, "placement": {1: "d"}}
    )
    store = await build_store(cfg, codec=RejectingCodec(), digests=digests_of(BLOCKS))
    try:
        key = BlockKey("bank", 1, 0)
        await store.tiers["d"].put(store.storage_name(key), BLOCKS[key])
        fetched = await store.fetch(key)
        assert isinstance(fetched.error, FetchFailedError)
        assert "cannot decode: tensor 'gate' has the wrong shape" in str(fetched.error)
    finally:
        await store.aclose()


async def test_creating_a_bucket_at_an_endpoint_that_is_down_is_a_tier_error() -> None:
    """What `hmem bank push --create-bucket` and the server's first start meet with MinIO down."""
    tier = S3Tier(
        "hmem",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        region="us-east-1",
        max_attempts=1,
        **S3_CREDENTIALS,  # type: ignore[arg-type]
    )
    try:
        with pytest.raises(TierUnavailableError, match="head bucket failed"):
            await tier.create_bucket()
    finally:
        await tier.aclose()
