"""Start-up seeding of the embedded default tiers: digests checked on a small bank, and repairs.

Through `Runtime.open` itself, on a random bank with the demo bank's anchor, its blocks seeded
into the embedded default (LMDB for level 1, a directory below) under a private data directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from server.bank import Bank, load_manifest, write_random_bank
from server.bank.push import stored_name, verify_bank
from server.defaults import DEMO_BANK, embedded_store_config
from server.runtime import Runtime
from server.settings import Settings, load_settings
from tiers import BlockKey, open_tier

N_BLOCKS = 4 + 16


@pytest.fixture
def bank(tmp_path: Path) -> Bank:
    write_random_bank(
        tmp_path / "bank",
        levels=2,
        branching=4,
        widths=(8, 4),
        model=load_manifest(DEMO_BANK).model,
        anchor_dir=DEMO_BANK / "anchor",
    )
    return Bank.open(tmp_path / "bank")


def settings_for(bank: Bank, tmp_path: Path, **extra: Any) -> Settings:
    return load_settings(bank=bank.path, data_dir=tmp_path / "state", warmup=False, **extra)


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[Runtime]:
    rt = await Runtime.open(settings)
    try:
        yield rt
    finally:
        await rt.close()


async def open_and_log(settings: Settings, caplog: pytest.LogCaptureFixture) -> str:
    """Open the runtime and close it; the one seeding line it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="server.runtime"):
        async with served(settings):
            pass
    (line,) = [r.getMessage() for r in caplog.records if "seeded the default tiers" in r.message]
    return line


async def verify_default_tiers(bank: Bank, settings: Settings) -> dict[str, dict[str, str]]:
    """The embedded default tiers' corrupt copies, per tier (empty when all are good)."""
    config = embedded_store_config(settings, bank.manifest)
    tiers = {name: open_tier(name, t) for name, t in config.tiers.items()}
    try:
        report = await verify_bank(bank, tiers, config.placement, progress=False)
    finally:
        for tier in tiers.values():
            await tier.aclose()
    assert all(not t.missing for t in report.tiers.values())
    return {name: t.corrupt for name, t in report.tiers.items() if t.corrupt}


def flip_disk_copy(settings: Settings, bank: Bank, key: BlockKey) -> None:
    assert settings.data_dir is not None
    path = settings.data_dir / "tiers" / "disk" / f"{stored_name(bank, key)}.blk"
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0xFF]))


async def flip_flash_copy(settings: Settings, bank: Bank, key: BlockKey) -> None:
    config = embedded_store_config(settings, bank.manifest)
    flash = open_tier("flash", config.tiers["flash"])
    try:
        data = bytearray(await flash.get(stored_name(bank, key)) or b"")
        data[len(data) // 2] ^= 0x01
        await flash.put(stored_name(bank, key), data)
    finally:
        await flash.aclose()


async def test_a_small_bank_is_seeded_with_digests_checked_and_says_so(
    bank: Bank, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(bank, tmp_path)
    first = await open_and_log(settings, caplog)
    assert "copies already there sha256-checked" in first
    assert f"{N_BLOCKS} written, 0 checked good, 0 trusted, 0 repaired" in first
    again = await open_and_log(settings, caplog)
    assert f"0 written, {N_BLOCKS} checked good, 0 trusted, 0 repaired" in again


async def test_seeding_repairs_corrupt_disk_and_lmdb_copies_of_a_small_bank(
    bank: Bank, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(bank, tmp_path)
    await open_and_log(settings, caplog)
    on_flash, on_disk = BlockKey("tiny", 1, 2), BlockKey("tiny", 2, 11)
    await flip_flash_copy(settings, bank, on_flash)
    flip_disk_copy(settings, bank, on_disk)
    assert await verify_default_tiers(bank, settings) == {
        "flash": {str(on_flash): "sha256 does not match the manifest"},
        "disk": {str(on_disk): "sha256 does not match the manifest"},
    }

    line = await open_and_log(settings, caplog)
    assert f"0 written, {N_BLOCKS - 2} checked good, 0 trusted, 2 repaired" in line
    assert await verify_default_tiers(bank, settings) == {}


async def test_above_the_limit_copies_are_trusted_and_a_corrupt_one_is_served_from_the_bank(
    bank: Bank, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(bank, tmp_path, seed_verify_max_bytes=1000)  # smaller than the bank
    await open_and_log(settings, caplog)
    key = BlockKey("tiny", 2, 5)
    flip_disk_copy(settings, bank, key)

    line = await open_and_log(settings, caplog)
    assert "trusted on name and size" in line
    assert "> seed_verify_max_bytes" in line
    assert f"0 written, 0 checked good, {N_BLOCKS} trusted, 0 repaired" in line
    assert await verify_default_tiers(bank, settings) == {
        "disk": {str(key): "sha256 does not match the manifest"}
    }

    async with served(settings) as rt:
        fetched = await rt.store.fetch(key)
        assert (fetched.error, fetched.tier, fetched.corrupt) == (None, "origin", ("disk",))
        await rt.store.drain()
    assert await verify_default_tiers(bank, settings) == {}  # repaired by the store
