"""BlockCache: byte budget, cost-aware eviction, pinning, single-flight loads."""

from __future__ import annotations

import asyncio

import pytest

from tiers import BlockCache


def test_a_cheap_large_block_is_evicted_before_a_costly_small_one() -> None:
    cache: BlockCache[str] = BlockCache(1000)
    cache.put("flash-block", "a", nbytes=600, level=1, cost_s=0.001)  # big, refetch from flash
    cache.put("cloud-block", "b", nbytes=300, level=3, cost_s=0.05)  # small, refetch from cloud
    cache.put("newcomer", "c", nbytes=300, level=2, cost_s=0.01)
    assert "cloud-block" in cache
    assert "newcomer" in cache
    assert "flash-block" not in cache


def test_hits_raise_priority() -> None:
    cache: BlockCache[str] = BlockCache(200)
    cache.put("a", "a", nbytes=100, level=2, cost_s=0.01)
    cache.put("b", "b", nbytes=100, level=2, cost_s=0.01)
    for _ in range(3):
        assert cache.get("a") == "a"
    cache.put("c", "c", nbytes=100, level=2, cost_s=0.01)
    assert "a" in cache
    assert "b" not in cache


def test_level_weights_keep_shallow_blocks() -> None:
    cache: BlockCache[str] = BlockCache(200, level_weights={1: 10.0})
    cache.put("shallow", "s", nbytes=100, level=1, cost_s=0.01)
    cache.put("deep", "d", nbytes=100, level=3, cost_s=0.01)
    cache.put("new", "n", nbytes=100, level=3, cost_s=0.01)
    assert "shallow" in cache
    assert "deep" not in cache


def test_pinned_entries_are_never_evicted_but_count_against_the_budget() -> None:
    cache: BlockCache[str] = BlockCache(300, pinned_levels=[1])
    cache.put("l1", "x", nbytes=200, level=1, cost_s=0.0)
    for i in range(10):
        cache.put(f"l3-{i}", "y", nbytes=100, level=3, cost_s=1.0)
        assert cache.held_bytes <= 300
    assert cache.is_pinned("l1")
    assert cache.stats().pinned_bytes == 200
    # Nothing over the unpinned budget is admitted (returned to its caller, not cached).
    assert not cache.put("too-big", "z", nbytes=150, level=3, cost_s=1.0)
    assert cache.stats().rejected == 1


def test_pin_and_unpin_a_key() -> None:
    cache: BlockCache[str] = BlockCache(200)
    cache.put("k", "v", nbytes=100, level=2, cost_s=0.0)
    cache.pin("k")
    cache.put("a", "a", nbytes=100, level=2, cost_s=1.0)
    cache.put("b", "b", nbytes=100, level=2, cost_s=1.0)
    assert "k" in cache
    cache.unpin("k")
    cache.put("c", "c", nbytes=100, level=2, cost_s=1.0)
    assert "k" not in cache


def test_zero_capacity_caches_nothing() -> None:
    cache: BlockCache[str] = BlockCache(0)
    assert not cache.put("k", "v", nbytes=1, level=1, cost_s=1.0)
    assert cache.get("k") is None


def test_negative_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BlockCache(-1)
    with pytest.raises(ValueError, match="nbytes"):
        BlockCache[str](10).put("k", "v", nbytes=-1, level=1, cost_s=0.0)


async def test_concurrent_loads_of_one_key_share_one_call() -> None:
    cache: BlockCache[str] = BlockCache(1000)
    calls = 0
    release = asyncio.Event()

    async def load() -> tuple[str, int]:
        nonlocal calls
        calls += 1
        await release.wait()
        return "value", 5

    waiters = [
        asyncio.create_task(cache.get_or_load("k", load, level=1, cost_s=0.1)) for _ in range(20)
    ]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1
    assert results == [("value", False)] * 20
    assert await cache.get_or_load("k", load, level=1, cost_s=0.1) == ("value", True)


async def test_a_waiter_that_gives_up_does_not_cancel_the_shared_load() -> None:
    cache: BlockCache[str] = BlockCache(1000)
    release = asyncio.Event()

    async def load() -> tuple[str, int]:
        await release.wait()
        return "late", 4

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await cache.get_or_load("k", load, level=3, cost_s=0.1)
    assert cache.inflight() == 1
    release.set()
    await asyncio.sleep(0.01)
    assert cache.get("k") == "late"


async def test_a_failed_load_is_not_remembered() -> None:
    cache: BlockCache[str] = BlockCache(1000)
    attempts = 0

    async def load() -> tuple[str, int]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("transient")
        return "ok", 2

    with pytest.raises(OSError, match="transient"):
        await cache.get_or_load("k", load, level=1, cost_s=0.1)
    assert await cache.get_or_load("k", load, level=1, cost_s=0.1) == ("ok", False)
