"""A bank's manifest and codec plugged into `tiers`: verified reads decoded into blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.bank import Bank, BankBlockCodec, write_random_bank
from server.bank.push import stored_name
from server.model.memory import MemoryBlock, MemoryType
from tests.server.bank.helpers import targets_for
from tiers import (
    BlockCache,
    BlockKey,
    DiskTier,
    FetchFailedError,
    IntegrityError,
    LmdbTier,
    TieredStore,
)
from tiers.store import StoredBlock


def same(a: MemoryBlock, b: MemoryBlock) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


async def pushed_store(bank: Bank, tmp_path: Path) -> TieredStore[MemoryBlock]:
    """Level 1 on LMDB (zero-copy views), level 2 on disk, as `hmem bank push` would place them."""
    flash = LmdbTier(tmp_path / "flash", map_size=1 << 26)
    disk = DiskTier(tmp_path / "disk", fsync=False)
    for key in bank.block_keys():
        tier = flash if key.level == 1 else disk
        await tier.put(stored_name(bank, key), bank.block_bytes(key))
    ram: BlockCache[StoredBlock[MemoryBlock]] = BlockCache(1 << 24)
    return TieredStore(
        {"flash": flash, "disk": disk},
        {1: ["flash"], 2: ["disk"]},
        codec=BankBlockCodec(bank.manifest),
        ram=ram,
        digests=bank.manifest.digests(),
    )


@pytest.mark.parametrize("memory_type", list(MemoryType))
async def test_store_fetches_verified_blocks_equal_to_the_bank(
    tmp_path: Path, memory_type: MemoryType
) -> None:
    write_random_bank(
        tmp_path / "bank", memory_type=memory_type, lora_targets=targets_for(memory_type),
        dtype="bfloat16", widths=(8, 4),
    )  # fmt: skip
    bank = Bank.open(tmp_path / "bank", require_anchor=False)
    store = await pushed_store(bank, tmp_path)
    try:
        path = [BlockKey("tiny", 1, 2), BlockKey("tiny", 2, 9)]
        fetched = await store.fetch_many(path)
        for key, f in zip(path, fetched, strict=True):
            assert f.error is None
            assert f.value is not None
            assert f.tier == ("flash" if key.level == 1 else "disk")
            assert same(f.value, bank.read_block(key))
            assert store.codec.nbytes(f.value) == bank.manifest.fetch_bytes([key.level])
        again = await store.fetch(path[0])
        assert again.cached
        assert again.value is fetched[0].value
    finally:
        await store.aclose()


async def test_store_refuses_a_block_whose_bytes_differ_from_the_manifest(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "bank")
    bank = Bank.open(tmp_path / "bank", require_anchor=False)
    store = await pushed_store(bank, tmp_path)
    try:
        key = BlockKey("tiny", 2, 5)
        data = bytearray(bank.block_bytes(key))
        data[-1] ^= 0x01
        await store.tiers["disk"].put(stored_name(bank, key), bytes(data))
        fetched = await store.fetch(key)
        assert isinstance(fetched.error, FetchFailedError)
        assert any(isinstance(c, IntegrityError) for c in fetched.error.causes)
        assert fetched.value is None
    finally:
        await store.aclose()
