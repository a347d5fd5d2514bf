"""The bank directory as a read-only tier: its contract, and serving and repairing through a store.

Real files and a real `TieredStore` over a real disk tier; a copy is corrupted by flipping bytes
of its file in the disk tier.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from server.bank import Bank, BankBlockCodec, write_random_bank
from server.bank.origin import OriginTier
from server.bank.push import push_bank, stored_name, verify_bank
from server.model.memory import MemoryBlock
from tiers import BlockCache, BlockKey, DiskTier, Tier, TieredStore, TierUnavailableError
from tiers.errors import CorruptBlockError
from tiers.store import StoredBlock


@pytest.fixture
def bank(tmp_path: Path) -> Bank:
    write_random_bank(tmp_path / "bank", levels=2, branching=4, widths=(8, 4))
    return Bank.open(tmp_path / "bank", require_anchor=False)


@pytest.fixture
async def origin(bank: Bank) -> AsyncIterator[OriginTier]:
    tier = OriginTier(bank)
    yield tier
    await tier.aclose()


# -- the tier contract ----------------------------------------------------------------------------


async def test_it_serves_a_blocks_file_by_its_storage_name(bank: Bank, origin: OriginTier) -> None:
    assert isinstance(origin, Tier)
    assert origin.read_only is True
    key = BlockKey("tiny", 2, 9)
    name = stored_name(bank, key)
    assert await origin.get(name) == bank.block_bytes(key)
    assert await origin.read(name, lambda view: view.nbytes) == bank.manifest.blocks[str(key)].bytes
    assert await origin.contains(name)
    other = stored_name(bank, BlockKey("tiny", 1, 0))
    assert await origin.get_many([name, other]) == [
        bank.block_bytes(key),
        bank.block_bytes(BlockKey("tiny", 1, 0)),
    ]


async def test_names_of_another_build_or_bank_or_no_content_are_misses(
    bank: Bank, origin: OriginTier
) -> None:
    key = BlockKey("tiny", 2, 9)
    sha = bank.manifest.blocks[str(key)].sha256
    other_content = f"{key}.{'0' * 16}" if not sha.startswith("0" * 16) else f"{key}.{'1' * 16}"
    misses = [
        str(key),  # unsuffixed: a name from before content naming
        other_content,  # another build's copy of this block
        f"other/L2/9.{sha[:16]}",  # another bank
        f"tiny/L2/99.{sha[:16]}",  # no such block
        "tiny/manifest.json",  # not a block name at all
    ]
    for name in misses:
        assert await origin.get(name) is None, name
        assert not await origin.contains(name), name


async def test_a_block_file_gone_from_the_bank_is_a_miss(bank: Bank, origin: OriginTier) -> None:
    key = BlockKey("tiny", 1, 2)
    bank.block_path(key).unlink()
    assert await origin.get(stored_name(bank, key)) is None
    assert not await origin.contains(stored_name(bank, key))
    listed = dict(await origin.scan())
    assert stored_name(bank, key) not in listed
    assert len(listed) == len(bank.manifest.blocks) - 1


async def test_scan_lists_every_block_by_storage_name_and_size(
    bank: Bank, origin: OriginTier
) -> None:
    assert dict(await origin.scan()) == {
        stored_name(bank, key): bank.manifest.blocks[str(key)].bytes for key in bank.block_keys()
    }


async def test_writes_are_refused_and_change_nothing(bank: Bank, origin: OriginTier) -> None:
    key = BlockKey("tiny", 1, 1)
    name = stored_name(bank, key)
    before = bank.block_path(key).read_bytes()
    with pytest.raises(TierUnavailableError, match="read-only"):
        await origin.put(name, b"x" * len(before))
    with pytest.raises(TierUnavailableError, match="read-only"):
        await origin.delete(name)
    assert bank.block_path(key).read_bytes() == before


async def test_push_and_verify_can_read_it_as_a_source_tier(bank: Bank, origin: OriginTier) -> None:
    """As a tier of the placement it is whole: every copy checks good, nothing is written."""
    placement = {1: ["origin"], 2: ["origin"]}
    report = await push_bank(bank, {"origin": origin}, placement, progress=False)
    assert (report.total.checked, report.total.written) == (len(bank.manifest.blocks), 0)
    assert (await verify_bank(bank, {"origin": origin}, placement, progress=False)).ok


# -- through a store ------------------------------------------------------------------------------


async def store_over(bank: Bank, tmp_path: Path) -> TieredStore[MemoryBlock]:
    """Both levels on one disk tier, every block pushed, the origin added last."""
    disk = DiskTier(tmp_path / "disk", fsync=False)
    await push_bank(bank, {"disk": disk}, {1: ["disk"], 2: ["disk"]}, progress=False)
    ram: BlockCache[StoredBlock[MemoryBlock]] = BlockCache(1 << 24)
    store = TieredStore(
        {"disk": disk},
        {1: ["disk"], 2: ["disk"]},
        codec=BankBlockCodec(bank.manifest),
        ram=ram,
        digests=bank.manifest.digests(),
    )
    store.add_tier("origin", OriginTier(bank), levels=[1, 2], read_only=True)
    return store


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)


def same(a: MemoryBlock, b: MemoryBlock) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


async def test_a_block_whose_only_copy_is_corrupt_is_served_from_the_bank_and_repaired(
    bank: Bank, tmp_path: Path
) -> None:
    store = await store_over(bank, tmp_path)
    try:
        key = BlockKey("tiny", 2, 6)
        copy = tmp_path / "disk" / f"{stored_name(bank, key)}.blk"
        flip_last_byte(copy)
        fetched = await store.fetch(key)
        assert fetched.error is None
        assert fetched.tier == "origin"
        assert fetched.corrupt == ("disk",)
        assert fetched.value is not None
        assert same(fetched.value, bank.read_block(key))
        await store.drain()
        assert copy.read_bytes() == bank.block_bytes(key)  # repaired from the bank directory
        disk = store.tiers["disk"]
        placement = {1: ["disk"], 2: ["disk"]}
        assert (await verify_bank(bank, {"disk": disk}, placement, progress=False)).ok
    finally:
        await store.aclose()


async def test_a_missing_copy_is_served_from_the_bank(bank: Bank, tmp_path: Path) -> None:
    store = await store_over(bank, tmp_path)
    try:
        key = BlockKey("tiny", 1, 3)
        (tmp_path / "disk" / f"{stored_name(bank, key)}.blk").unlink()
        fetched = await store.fetch(key)
        assert (fetched.error, fetched.tier) == (None, "origin")
    finally:
        await store.aclose()


async def test_with_no_good_copy_anywhere_the_fetch_fails_and_the_bank_is_left(
    bank: Bank, tmp_path: Path
) -> None:
    store = await store_over(bank, tmp_path)
    try:
        key = BlockKey("tiny", 2, 1)
        flip_last_byte(bank.block_path(key))
        flip_last_byte(tmp_path / "disk" / f"{stored_name(bank, key)}.blk")
        rotten = bank.block_path(key).read_bytes()
        fetched = await store.fetch(key)
        assert isinstance(fetched.error, CorruptBlockError)
        assert fetched.corrupt == ("disk", "origin")
        await store.drain()
        assert bank.block_path(key).read_bytes() == rotten  # never written
    finally:
        await store.aclose()
