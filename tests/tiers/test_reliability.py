"""Reliability of the store on real tiers: copies named after their content, corrupt copies
reported and repaired, read-only tiers, hedged reads, and breakers that open on deadline misses."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import S3Server
from tests.tiers.conftest import blob, open_s3
from tests.tiers.helpers import (
    HangingTier,
    ReadOnlyTier,
    digests_of,
    make_blocks,
    metric,
    seed_homes,
    tier_reads,
)
from tiers import (
    BlockCache,
    BlockKey,
    BlockNotFoundError,
    BreakerState,
    BytesCodec,
    CircuitOpenError,
    ConfigError,
    CorruptBlockError,
    DeviceProfile,
    DiskTier,
    FetchFailedError,
    FetchTimeoutError,
    LmdbTier,
    ProfiledTier,
    StoreConfig,
    StorePolicy,
    Tier,
    TieredStore,
    TierWrapper,
    storage_key,
)
from tiers.base import Consume, T

BLOCKS = make_blocks({1: 2, 2: 4, 3: 8})
LEVEL3 = {k: v for k, v in BLOCKS.items() if k.level == 3}


def make_store(
    tiers: dict[str, Tier],
    placement: dict[int, list[str]],
    *,
    blocks: dict[BlockKey, bytes] = BLOCKS,
    **policy: object,
) -> TieredStore[bytes]:
    return TieredStore(
        tiers,
        placement,
        codec=BytesCodec(),
        ram=BlockCache(64 << 20),
        digests=digests_of(blocks),
        policy=StorePolicy(**policy),  # type: ignore[arg-type]
    )


def breaker(store: TieredStore[bytes], tier: str) -> BreakerState:
    return store.breaker(tier).state


def damaged(data: bytes) -> bytes:
    return data[:50] + bytes([data[50] ^ 0xFF]) + data[51:]


@pytest.fixture
async def flash_and_disk(tmp_path: Path) -> AsyncIterator[TieredStore[bytes]]:
    """Level 1 on flash with a replica on disk; levels 2 and 3 on disk."""
    tiers: dict[str, Tier] = {
        "flash": LmdbTier(tmp_path / "flash", map_size=1 << 28),
        "disk": DiskTier(tmp_path / "disk"),
    }
    store = make_store(tiers, {1: ["flash", "disk"], 2: ["disk"], 3: ["disk"]})
    await seed_homes(store, BLOCKS)
    yield store
    await store.aclose()


# -- copies named after their content -----------------------------------------------------------


async def test_a_copy_under_a_stale_or_unsuffixed_name_is_never_read(
    flash_and_disk: TieredStore[bytes],
) -> None:
    store, key = flash_and_disk, BlockKey("bank", 2, 3)
    disk = store.tiers["disk"]
    await disk.delete(store.storage_name(key))
    stale = blob(4096, seed=99)  # an earlier build's block, under both names it could have
    await disk.put(str(key), stale)
    await disk.put(storage_key(key, hashlib.sha256(stale).hexdigest()), stale)

    fetched = await store.fetch(key)
    assert isinstance(fetched.error, BlockNotFoundError)
    assert tier_reads(store, "disk", "corrupt") == 0  # not even read and rejected: a miss
    assert tier_reads(store, "disk", "miss") == 1
    assert store.storage_name(key) == f"bank/L2/3.{hashlib.sha256(BLOCKS[key]).hexdigest()[:16]}"


async def test_a_rebuilt_block_is_fetched_under_its_new_name(tmp_path: Path) -> None:
    key = BlockKey("bank", 3, 1)
    old = make_store({"disk": DiskTier(tmp_path / "disk")}, {3: ["disk"]})
    await seed_homes(old, LEVEL3)
    assert (await old.fetch(key)).value == BLOCKS[key]

    rebuilt = dict(BLOCKS) | {key: blob(4096, seed=12345)}  # the same key, new bytes
    new = make_store({"disk": DiskTier(tmp_path / "disk")}, {3: ["disk"]}, blocks=rebuilt)
    try:
        assert isinstance((await new.fetch(key)).error, BlockNotFoundError)  # not pushed yet
        await new.tiers["disk"].put(new.storage_name(key), rebuilt[key])
        fetched = await new.fetch(key)
        assert fetched.value == rebuilt[key]
        assert fetched.corrupt == ()
        # Both builds' copies live side by side: the old store still serves its own bytes.
        old.clear_cache()
        assert (await old.fetch(key)).value == BLOCKS[key]
    finally:
        await new.aclose()
        await old.aclose()


# -- corrupt copies: reported, repaired, or a distinct error ------------------------------------


async def test_a_corrupt_home_copy_is_reported_served_from_the_replica_and_repaired(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    tiers: dict[str, Tier] = {
        "disk": DiskTier(tmp_path / "disk"),
        "cloud": await open_s3(s3_server, s3_bucket),
    }
    store = make_store(tiers, {2: ["disk", "cloud"]}, hedge_after_s=None)
    try:
        key = BlockKey("bank", 2, 1)
        name, good = store.storage_name(key), BLOCKS[key]
        await tiers["disk"].put(name, damaged(good))
        await tiers["cloud"].put(name, good)

        with caplog.at_level(logging.INFO, logger="tiers.store"):
            fetched = await store.fetch(key)
            await store.drain()
        assert fetched.value == good
        assert fetched.tier == "cloud"
        assert fetched.corrupt == ("disk",)
        reg = store.metrics.registry
        assert metric(reg, "hmem_tier_corrupt_total", tier="disk", level="2") == 1
        assert metric(reg, "hmem_tier_repairs_total", tier="disk", result="ok") == 1
        assert await tiers["disk"].get(name) == good  # the home copy verifies again
        logged = [r.getMessage() for r in caplog.records]
        assert any("'disk'" in m and str(key) in m and "verification" in m for m in logged)
        assert any("repaired" in m and "'disk'" in m and str(key) in m for m in logged)

        again = await store.fetch(key)
        assert (again.tier, again.corrupt) == ("ram", ())
        store.clear_cache()
        assert (await store.fetch(key)).tier == "disk"  # read from the repaired home
        assert store.unrepaired() == {}
    finally:
        await store.aclose()


async def test_no_good_copy_anywhere_is_a_corrupt_block_error_until_one_appears(
    flash_and_disk: TieredStore[bytes],
) -> None:
    store, key = flash_and_disk, BlockKey("bank", 1, 0)
    name, good = store.storage_name(key), BLOCKS[key]
    await store.tiers["flash"].put(name, damaged(good))
    await store.tiers["disk"].put(name, good[:-1])  # truncated

    fetched = await store.fetch(key)
    assert isinstance(fetched.error, CorruptBlockError)
    assert isinstance(fetched.error, FetchFailedError)  # callers that know only that still work
    assert fetched.corrupt == fetched.error.corrupt == ("flash", "disk")
    assert store.unrepaired() == {1: {key}}
    reg = store.metrics.registry
    assert metric(reg, "hmem_store_unrepaired_blocks", level="1") == 1
    assert metric(reg, "hmem_block_fetches_total", level="1", outcome="corrupt") == 1
    assert metric(reg, "hmem_tier_repairs_total", tier="flash", result="ok") == 0

    await store.tiers["disk"].put(name, good)  # an operator re-pushes the replica
    fetched = await store.fetch(key)
    assert (fetched.value, fetched.tier, fetched.corrupt) == (good, "disk", ("flash",))
    assert store.unrepaired() == {}
    assert metric(reg, "hmem_store_unrepaired_blocks", level="1") == 0
    await store.drain()
    assert await store.tiers["flash"].get(name) == good


async def test_a_corrupt_copy_behind_a_missing_one_is_still_corrupt_not_missing(
    flash_and_disk: TieredStore[bytes],
) -> None:
    store, key = flash_and_disk, BlockKey("bank", 1, 1)
    await store.tiers["flash"].delete(store.storage_name(key))
    await store.tiers["disk"].put(store.storage_name(key), damaged(BLOCKS[key]))
    fetched = await store.fetch(key)
    assert isinstance(fetched.error, CorruptBlockError)
    assert fetched.corrupt == ("disk",)


# -- read-only tiers ----------------------------------------------------------------------------


async def test_read_only_tiers_serve_and_are_never_written(tmp_path: Path) -> None:
    origin_root = tmp_path / "origin"
    tiers: dict[str, Tier] = {
        "flash": LmdbTier(tmp_path / "flash", map_size=1 << 28),
        "ro": ReadOnlyTier(DiskTier(tmp_path / "ro")),  # says `read_only = True` itself
    }
    store = make_store(tiers, {1: ["ro", "flash"], 2: ["flash"]}, hedge_after_s=None)
    store.add_tier("origin", DiskTier(origin_root), levels=[1, 2], read_only=True)
    try:
        assert store.chain(1) == ["ro", "flash", "origin"]
        assert store.read_only == {"ro", "origin"}
        for key, data in BLOCKS.items():
            if key.level <= 2:
                await store.tiers["origin"].put(store.storage_name(key), data)  # as built

        # A corrupt copy on a read-only tier is reported and left; the writable one is repaired.
        a = BlockKey("bank", 1, 0)
        await tiers["ro"].put(store.storage_name(a), damaged(BLOCKS[a]))
        await tiers["flash"].put(store.storage_name(a), damaged(BLOCKS[a]))
        fetched = await store.fetch(a)
        assert (fetched.tier, fetched.corrupt) == ("origin", ("ro", "flash"))
        # The origin answers when every copy is missing; nothing is written back to it.
        b = BlockKey("bank", 2, 2)
        assert (await store.fetch(b)).tier == "origin"
        await store.drain()

        assert await tiers["flash"].get(store.storage_name(a)) == BLOCKS[a]
        assert await tiers["ro"].get(store.storage_name(a)) == damaged(BLOCKS[a])
        reg = store.metrics.registry
        assert metric(reg, "hmem_tier_repairs_total", tier="ro", result="skipped") == 1
        assert metric(reg, "hmem_tier_repairs_total", tier="flash", result="ok") == 1
        written = sorted(p.relative_to(origin_root) for p in origin_root.rglob("*.blk"))
        assert len(written) == sum(1 for k in BLOCKS if k.level <= 2)  # only what we put
    finally:
        await store.aclose()


async def test_add_tier_refuses_a_taken_name_and_a_read_only_cache(tmp_path: Path) -> None:
    store = make_store({"disk": DiskTier(tmp_path / "d")}, {1: ["disk"]})
    try:
        with pytest.raises(ConfigError, match="taken"):
            store.add_tier("disk", DiskTier(tmp_path / "e"), levels=[1])
        with pytest.raises(ConfigError, match="levels"):
            store.add_tier("origin", DiskTier(tmp_path / "e"), levels=[])
        store.add_tier("origin", DiskTier(tmp_path / "e"), levels=[1, 4])
        assert store.chain(4) == ["origin"]  # a level with no home yet is served by it alone
        assert store.read_only == set()
    finally:
        await store.aclose()
    ro = ReadOnlyTier(DiskTier(tmp_path / "f"))
    with pytest.raises(ConfigError, match="read-only"):
        TieredStore(
            {"c": ro, "d": DiskTier(tmp_path / "g")},
            {1: ["d"]},
            codec=BytesCodec(),
            ram=BlockCache(0),
            digests=None,
            cache_tiers=["c"],
        )


# -- hedged reads and deadline misses -----------------------------------------------------------


async def test_a_hedged_read_returns_from_the_replica_while_the_home_hangs(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    cloud = HangingTier(await open_s3(s3_server, s3_bucket))
    tiers: dict[str, Tier] = {"cloud": cloud, "disk": DiskTier(tmp_path / "disk")}
    store = make_store(tiers, {3: ["cloud", "disk"]}, deadline_s=1.0, hedge_after_s=0.05)
    try:
        await seed_homes(store, LEVEL3)
        key = BlockKey("bank", 3, 4)
        await tiers["disk"].put(store.storage_name(key), BLOCKS[key])

        started = time.perf_counter()
        fetched = await store.fetch(key)
        elapsed = time.perf_counter() - started
        assert fetched.value == BLOCKS[key]
        assert fetched.tier == "disk"
        assert 0.05 <= elapsed < 0.3  # the hedge delay, then a disk read: far inside 1 s
        reg = store.metrics.registry
        assert metric(reg, "hmem_store_hedges_total", level="3", result="won") == 1
        assert (cloud.started, cloud.cancelled) == (1, 1)  # the hung read was cancelled
        assert breaker(store, "cloud") is BreakerState.CLOSED
        assert metric(reg, "hmem_tier_deadline_misses_total", tier="cloud", level="3") == 0

        cloud.release()  # the home answers again, and serves what only it holds
        fetched = await store.fetch(BlockKey("bank", 3, 5))
        assert (fetched.tier, fetched.value) == ("cloud", BLOCKS[BlockKey("bank", 3, 5)])
        assert metric(reg, "hmem_store_hedges_total", level="3", result="won") == 1
    finally:
        cloud.release()
        await store.aclose()


async def test_a_cancelled_hedged_probe_lets_the_next_read_probe(tmp_path: Path) -> None:
    home = HangingTier(DiskTier(tmp_path / "home"))
    tiers: dict[str, Tier] = {"home": home, "replica": DiskTier(tmp_path / "replica")}
    store = make_store(
        tiers, {2: ["home", "replica"]}, hedge_after_s=0.02, breaker_failures=1,
        breaker_reset_s=0.05,
    )  # fmt: skip
    try:
        for key, data in BLOCKS.items():
            await tiers["replica"].put(store.storage_name(key), data)
        store.breaker("home").record_failure()  # open, as after an error
        await asyncio.sleep(0.06)
        assert breaker(store, "home") is BreakerState.HALF_OPEN

        fetched = await store.fetch(BlockKey("bank", 2, 0))  # its home read is the probe
        assert fetched.tier == "replica"
        assert home.cancelled == 1
        assert store.breaker("home").before_call()  # the probe was released, not stuck
    finally:
        home.release()
        await store.aclose()


async def test_a_hanging_tier_opens_its_breaker_within_breaker_failures_deadlines(
    tmp_path: Path,
) -> None:
    home = HangingTier(DiskTier(tmp_path / "disk"))
    deadline, failures = 0.1, 3
    store = make_store(
        {"disk": home}, {3: ["disk"]}, deadline_s=deadline, tier_timeout_s=5.0,
        breaker_failures=failures,
    )  # fmt: skip
    try:
        await seed_homes(store, LEVEL3)
        started = time.perf_counter()
        for node in range(failures):
            fetched = await store.fetch(BlockKey("bank", 3, node))
            assert isinstance(fetched.error, FetchTimeoutError)
        elapsed = time.perf_counter() - started
        assert breaker(store, "disk") is BreakerState.OPEN
        assert elapsed < failures * deadline + 0.15  # deadlines, not 5 s tier timeouts
        reg = store.metrics.registry
        assert metric(reg, "hmem_tier_deadline_misses_total", tier="disk", level="3") == failures

        started = time.perf_counter()
        refused = await store.fetch(BlockKey("bank", 3, 7))
        assert time.perf_counter() - started < 0.8 * deadline  # refused at once, not waited for
        assert isinstance(refused.error, FetchFailedError)
        assert isinstance(refused.error.causes[0], CircuitOpenError)
    finally:
        home.release()
        await store.aclose()


async def test_a_deadline_miss_is_not_counted_again_when_the_read_times_out(
    tmp_path: Path,
) -> None:
    home = HangingTier(DiskTier(tmp_path / "disk"))
    store = make_store(
        {"disk": home}, {3: ["disk"]}, deadline_s=0.05, tier_timeout_s=0.2, breaker_failures=2
    )
    try:
        await seed_homes(store, LEVEL3)
        assert isinstance((await store.fetch(BlockKey("bank", 3, 0))).error, FetchTimeoutError)
        await asyncio.sleep(0.25)  # the read itself has timed out by now
        assert tier_reads(store, "disk", "timeout") == 1
        assert breaker(store, "disk") is BreakerState.CLOSED  # one failure, not two
        assert isinstance((await store.fetch(BlockKey("bank", 3, 1))).error, FetchTimeoutError)
        assert breaker(store, "disk") is BreakerState.OPEN
    finally:
        home.release()
        await store.aclose()


async def test_with_deadline_misses_not_counted_only_tier_timeouts_open_the_breaker(
    tmp_path: Path,
) -> None:
    home = HangingTier(DiskTier(tmp_path / "disk"))
    store = make_store(
        {"disk": home}, {3: ["disk"]}, deadline_s=0.05, tier_timeout_s=5.0, breaker_failures=2,
        count_deadline_misses=False,
    )  # fmt: skip
    try:
        await seed_homes(store, LEVEL3)
        for node in range(4):
            assert isinstance((await store.fetch(BlockKey("bank", 3, node))).error, Exception)
        assert breaker(store, "disk") is BreakerState.CLOSED
    finally:
        home.release()
        await store.aclose()


async def test_a_tier_that_keeps_answering_through_a_backlog_is_not_cut_off(
    tmp_path: Path,
) -> None:
    """A burst queued on a working tier misses deadlines, but the tier answers all along: its
    breaker stays closed (only a tier that answers nothing is failing)."""
    link = DeviceProfile("slow-link", latency_s=0.0, bandwidth_bytes_s=4096 / 0.02)  # 20 ms/block
    home = ProfiledTier(DiskTier(tmp_path / "disk"), link)
    store = make_store({"disk": home}, {3: ["disk"]}, deadline_s=0.05, breaker_failures=2)
    try:
        await seed_homes(store, LEVEL3)
        keys = sorted(LEVEL3)
        fetched = await store.fetch_many(keys)  # answered at 20, 40, 60, ... ms
        assert sum(isinstance(f.error, FetchTimeoutError) for f in fetched) >= 4
        assert breaker(store, "disk") is BreakerState.CLOSED
        reg = store.metrics.registry
        assert metric(reg, "hmem_tier_deadline_misses_total", tier="disk", level="3") == 0
        await asyncio.sleep(0.2)  # the backlog drains into the RAM cache
        assert all(f.tier == "ram" for f in await store.fetch_many(keys))
    finally:
        await store.aclose()


# -- the common path and settings ---------------------------------------------------------------


async def test_a_ram_hit_completes_without_suspending(flash_and_disk: TieredStore[bytes]) -> None:
    """No task, no timer, no await: the coroutine finishes on its first step."""
    store, key = flash_and_disk, BlockKey("bank", 1, 1)
    assert (await store.fetch(key)).ok
    for coro in (store.fetch(key), store.fetch_many([key])):
        with pytest.raises(StopIteration) as stop:
            coro.send(None)
        got = stop.value.value
        assert (got[0] if isinstance(got, list) else got).tier == "ram"


def test_hedge_and_deadline_miss_settings() -> None:
    assert StorePolicy(deadline_s=2.0).hedge_delay_s == 0.5
    assert StorePolicy(hedge_after_s=None).hedge_delay_s is None
    assert StorePolicy(hedge_after_s=0.3).hedge_delay_s == 0.3
    with pytest.raises(ConfigError, match="hedge_after_s"):
        StorePolicy(hedge_after_s=0)
    base = {"tiers": {"d": {"kind": "disk", "root": "/tmp/x"}}, "placement": {1: "d"}}
    off = StoreConfig.model_validate(
        base | {"hedge_after_s": "off", "count_deadline_misses": False}
    )
    assert off.policy().hedge_after_s is None
    assert off.policy().count_deadline_misses is False
    assert StoreConfig.model_validate(base).policy().hedge_delay_s == 0.5
    assert StoreConfig.model_validate(base | {"hedge_after_s": 0.2}).policy().hedge_delay_s == 0.2
    with pytest.raises(ValueError, match="hedge_after_s"):
        StoreConfig.model_validate(base | {"hedge_after_s": -1})


class RaisingTier(TierWrapper):
    """A real tier whose reads raise `error`, an exception outside the tier contract (as a
    wrapper of ours or a backend's SDK might)."""

    def __init__(self, inner: Tier, error: Exception) -> None:
        super().__init__(inner)
        self.error = error

    async def read(self, key: str, consume: Consume[T]) -> T | None:
        raise self.error


@pytest.mark.parametrize("wrapped", [False, True], ids=["backend", "wrapper"])
async def test_an_odd_exception_from_the_home_falls_to_the_replica_and_counts_as_a_failure(
    tmp_path: Path, wrapped: bool
) -> None:
    """botocore's AttributeError from a deleted object was a 500 on every request of its path,
    the breaker never opening: any exception is now a failed read, like a tier error."""
    error = AttributeError("'StreamingChecksumBody' object has no attribute 'strip'")
    disk = DiskTier(tmp_path / "home")
    home: Tier = RaisingTier(disk, error) if wrapped else disk
    tiers: dict[str, Tier] = {"home": home, "replica": DiskTier(tmp_path / "replica")}
    store = make_store(tiers, {2: ["home", "replica"]}, breaker_failures=2, failure_ttl_s=0.0)
    try:
        keys = [k for k in BLOCKS if k.level == 2]
        for key in keys:
            await disk.put(store.storage_name(key), BLOCKS[key])
            await tiers["replica"].put(store.storage_name(key), BLOCKS[key])
        if not wrapped:

            def fail(*args: object) -> None:
                raise error

            disk._read = fail  # type: ignore[method-assign,assignment]
        for key in keys[:2]:
            fetched = await store.fetch(key)
            assert fetched.error is None
            assert (fetched.value, fetched.tier) == (BLOCKS[key], "replica")
        assert tier_reads(store, "home", "error") == 2
        assert breaker(store, "home") is BreakerState.OPEN  # two failures: it opens
        fetched = await store.fetch(keys[2])
        assert fetched.tier == "replica"
        assert tier_reads(store, "home", "skipped") == 1  # later reads skip the home
    finally:
        await store.aclose()
