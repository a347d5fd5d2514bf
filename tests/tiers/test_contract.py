"""One contract, every tier: LMDB and disk in temporary directories, S3 on a real HTTP server."""

from __future__ import annotations

import asyncio

import pytest

from tests.tiers.conftest import blob
from tiers import InvalidKeyError, Tier, TierUnavailableError

BAD_KEYS = [
    "",
    "../../etc/passwd",
    "/etc/passwd",
    "bank/../../x",
    "bank//L1",
    "bank/./L1",
    "bank\\L1\\0",
    "bank/L1/0/",
    "ba\x00nk",
    "bank/" + "x" * 600,
    ".hidden",
]


async def test_put_get_roundtrip(tier: Tier) -> None:
    data = blob(1000, seed=1)
    await tier.put("bank/L1/0", data)
    assert await tier.get("bank/L1/0") == data


async def test_missing_key_is_none_not_an_error(tier: Tier) -> None:
    assert await tier.get("bank/L1/404") is None
    assert await tier.read("bank/L1/404", len) is None
    assert not await tier.contains("bank/L1/404")


async def test_contains_and_delete(tier: Tier) -> None:
    await tier.put("bank/L2/7", b"block")
    assert await tier.contains("bank/L2/7")
    assert await tier.delete("bank/L2/7")
    assert not await tier.contains("bank/L2/7")
    assert not await tier.delete("bank/L2/7")


async def test_overwrite_replaces_the_value(tier: Tier) -> None:
    await tier.put("bank/L1/3", blob(5000, seed=1))
    await tier.put("bank/L1/3", blob(300, seed=2))
    assert await tier.get("bank/L1/3") == blob(300, seed=2)


@pytest.mark.slow
async def test_large_values_of_8_mib_and_more(tier: Tier) -> None:
    data = blob((8 << 20) + 12345, seed=3)
    await tier.put("bank/L1/big", data)
    assert await tier.get("bank/L1/big") == data


async def test_read_hands_consume_a_view_and_returns_its_result(tier: Tier) -> None:
    data = blob(4096, seed=4)
    await tier.put("bank/L3/9", data)
    seen: list[type] = []

    def consume(view: memoryview) -> int:
        seen.append(type(view))
        return sum(view[:16])

    assert await tier.read("bank/L3/9", consume) == sum(data[:16])
    assert seen == [memoryview]


async def test_concurrent_readers_all_see_the_right_bytes(tier: Tier) -> None:
    values = {f"bank/L2/{i}": blob(64 << 10, seed=i) for i in range(8)}
    await asyncio.gather(*(tier.put(k, v) for k, v in values.items()))
    keys = list(values) * 8
    results = await asyncio.gather(*(tier.get(k) for k in keys))
    assert results == [values[k] for k in keys]


async def test_get_many_keeps_order_and_reports_misses(tier: Tier) -> None:
    await tier.put("bank/L1/1", b"one")
    await tier.put("bank/L1/2", b"two")
    assert await tier.get_many(["bank/L1/2", "bank/L1/none", "bank/L1/1"]) == [
        b"two",
        None,
        b"one",
    ]


async def test_scan_lists_every_key_with_its_size(tier: Tier) -> None:
    await tier.put("bank/L1/0", b"a" * 10)
    await tier.put("bank/L2/5", b"b" * 20)
    assert sorted(await tier.scan()) == [("bank/L1/0", 10), ("bank/L2/5", 20)]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys_are_rejected_before_the_backend(tier: Tier, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await tier.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        await tier.get(key)
    with pytest.raises(InvalidKeyError):
        await tier.contains(key)
    assert await tier.scan() == []


# Types a backend might raise outside its own error classes: an SDK bug (botocore's
# `AttributeError: 'StreamingChecksumBody' object has no attribute 'strip'` on a deleted object),
# a lookup, arithmetic, or a plain RuntimeError.
ODD_ERRORS = [
    AttributeError("'StreamingChecksumBody' object has no attribute 'strip'"),
    KeyError("Body"),
    ZeroDivisionError("division by zero"),
    RuntimeError("backend state lost"),
    ValueError("bad header"),
]


@pytest.mark.parametrize("error", ODD_ERRORS, ids=lambda e: type(e).__name__)
async def test_any_exception_from_a_backend_is_a_tier_failure(tier: Tier, error: Exception) -> None:
    """Whatever the backend raises, a call is a `TierUnavailableError` naming its type: never an
    exception of another kind escaping to the store or the CLI."""
    await tier.put("k", blob(64))

    def fail(*args: object) -> None:
        raise error

    for method in ("_read", "_put", "_contains", "_delete"):
        setattr(tier, method, fail)  # the blocking backend call, as the tier runs it
    for call in (tier.get("k"), tier.put("k", b"x"), tier.contains("k"), tier.delete("k")):
        with pytest.raises(TierUnavailableError, match=type(error).__name__) as raised:
            await call
        assert raised.value.__cause__ is error
