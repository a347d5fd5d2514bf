"""A rebuilt bank pushed over an old one, and corrupt copies found and repaired by push and verify.

Real tiers (LMDB, a directory, S3 on moto); a copy is corrupted the way storage rots: bytes
flipped in the disk tier's file, or a same-size wrong copy written into LMDB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.bank import Bank, write_random_bank
from server.bank.push import push_bank, stored_name, verify_bank
from tests.conftest import S3Server
from tests.server.bank.placement import Placed, run_cli, tier_flags
from tiers import BlockKey

N_BLOCKS = 2 + 4 + 8
PER_TIER = {"flash": 2, "disk": 4, "cloud": 8}


def rebuild(bank: Bank, *, seed: int) -> Bank:
    """The same bank id and shape, new weights (another seed), written over it in place."""
    write_random_bank(bank.path, levels=3, branching=2, widths=(8, 4, 2), seed=seed, overwrite=True)
    return Bank.open(bank.path, require_anchor=False)


def flip_disk_copy(tmp_path: Path, bank: Bank, key: BlockKey) -> None:
    """Flip one byte of the disk tier's file of `key`, in place (same size)."""
    path = tmp_path / "disk" / f"{stored_name(bank, key)}.blk"
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0xFF]))


async def flip_lmdb_copy(placed: Placed, bank: Bank, key: BlockKey) -> None:
    flash = placed.tiers["flash"]
    data = bytearray(await flash.get(stored_name(bank, key)) or b"")
    data[len(data) // 2] ^= 0x01
    await flash.put(stored_name(bank, key), data)


async def copies_equal_the_bank(placed: Placed, bank: Bank) -> bool:
    for key in bank.block_keys():
        if await placed.home(key.level).get(stored_name(bank, key)) != bank.block_bytes(key):
            return False
    return True


async def test_a_rebuilt_bank_is_pushed_whole_and_the_old_builds_copies_are_stale(
    bank: Bank, placed: Placed
) -> None:
    await push_bank(bank, placed.tiers, placed.placement, progress=False)
    old_names = {stored_name(bank, k) for k in bank.block_keys()}

    new = rebuild(bank, seed=1)
    assert not old_names & {stored_name(new, k) for k in new.block_keys()}  # new content, new names
    report = await push_bank(new, placed.tiers, placed.placement, progress=False)
    assert {n: (t.written, t.checked, t.repaired) for n, t in report.tiers.items()} == {
        n: (count, 0, 0) for n, count in PER_TIER.items()
    }
    assert {n: len(t.stale) for n, t in report.tiers.items()} == PER_TIER
    assert set(report.total.stale) == old_names

    verified = await verify_bank(new, placed.tiers, placed.placement, progress=False)
    assert verified.ok
    assert {n: t.ok for n, t in verified.tiers.items()} == PER_TIER
    assert await copies_equal_the_bank(placed, new)

    pruned = await push_bank(new, placed.tiers, placed.placement, progress=False, prune=True)
    t = pruned.total
    assert (t.written, t.checked, t.pruned) == (0, N_BLOCKS, N_BLOCKS)
    for level, names in ((1, "flash"), (2, "disk"), (3, "cloud")):
        held = {k for k, _ in await placed.tiers[names].scan()}
        assert held == {stored_name(new, k) for k in new.block_keys(level)}


async def test_unsuffixed_copies_are_never_taken_for_present_ones(
    bank: Bank, placed: Placed
) -> None:
    """Copies named by key alone (before content names) are stale; other banks' are not ours."""
    disk = placed.tiers["disk"]
    for key in bank.block_keys(2):
        await disk.put(str(key), bank.block_bytes(key))  # a complete copy, under the old name
    await disk.put("other/L2/0", b"another bank's block")
    report = await push_bank(bank, placed.tiers, placed.placement, progress=False)
    assert (report.tiers["disk"].written, report.tiers["disk"].checked) == (4, 0)
    assert report.tiers["disk"].stale == sorted(str(k) for k in bank.block_keys(2))
    await push_bank(bank, placed.tiers, placed.placement, progress=False, prune=True)
    assert "other/L2/0" in {k for k, _ in await disk.scan()}


async def test_verify_names_corrupt_disk_and_lmdb_copies_and_push_repairs_them(
    bank: Bank, placed: Placed, tmp_path: Path
) -> None:
    await push_bank(bank, placed.tiers, placed.placement, progress=False)
    on_disk, on_flash = bank.block_keys(2)[1], bank.block_keys(1)[0]
    flip_disk_copy(tmp_path, bank, on_disk)
    await flip_lmdb_copy(placed, bank, on_flash)

    report = await verify_bank(bank, placed.tiers, placed.placement, progress=False)
    assert not report.ok
    assert report.tiers["disk"].corrupt == {str(on_disk): "sha256 does not match the manifest"}
    assert report.tiers["flash"].corrupt == {str(on_flash): "sha256 does not match the manifest"}
    assert report.repaired == 0

    pushed = await push_bank(bank, placed.tiers, placed.placement, progress=False)
    t = pushed.total
    assert (t.written, t.checked, t.repaired) == (0, N_BLOCKS - 2, 2)
    assert (pushed.tiers["disk"].repaired, pushed.tiers["flash"].repaired) == (1, 1)
    assert (await verify_bank(bank, placed.tiers, placed.placement, progress=False)).ok
    assert await copies_equal_the_bank(placed, bank)


async def test_verify_repair_rewrites_missing_and_corrupt_copies_from_the_bank(
    bank: Bank, placed: Placed, tmp_path: Path
) -> None:
    await push_bank(bank, placed.tiers, placed.placement, progress=False)
    corrupt, gone = bank.block_keys(2)[3], bank.block_keys(3)[6]
    flip_disk_copy(tmp_path, bank, corrupt)
    assert await placed.home(3).delete(stored_name(bank, gone))

    report = await verify_bank(bank, placed.tiers, placed.placement, progress=False, repair=True)
    assert report.ok  # everything found wrong was repaired
    assert report.tiers["disk"].corrupt.keys() == {str(corrupt)}
    assert report.tiers["disk"].repaired == [str(corrupt)]
    assert report.tiers["cloud"].missing == [str(gone)]
    assert report.tiers["cloud"].repaired == [str(gone)]
    again = await verify_bank(bank, placed.tiers, placed.placement, progress=False)
    assert again.ok
    assert again.repaired == 0
    assert await copies_equal_the_bank(placed, bank)


async def test_trust_existing_keeps_copies_of_the_right_size_unread(
    bank: Bank, placed: Placed, tmp_path: Path
) -> None:
    """For banks too large to read back: a torn copy is still rewritten, a rotten one is not."""
    await push_bank(bank, placed.tiers, placed.placement, progress=False)
    rotten, torn = bank.block_keys(2)[:2]
    flip_disk_copy(tmp_path, bank, rotten)
    await placed.home(2).put(stored_name(bank, torn), b"torn")
    report = await push_bank(
        bank, placed.tiers, placed.placement, progress=False, trust_existing=True
    )
    disk = report.tiers["disk"]
    assert (disk.trusted, disk.checked, disk.repaired, disk.written) == (3, 0, 1, 0)
    verified = await verify_bank(bank, placed.tiers, placed.placement, progress=False)
    assert verified.tiers["disk"].corrupt.keys() == {str(rotten)}  # left: verify finds it


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_push_and_verify_repair_report_what_they_did(
    bank: Bank,
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    aws_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = [f"--tier={flag}" for flag in tier_flags(tmp_path, s3_bucket)]
    common = [*flags, "--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1"]
    common.append("--no-progress")
    push = ["bank", "push", str(bank.path), *common]
    verify = ["bank", "verify", str(bank.path), *common]
    assert run_cli([*push, "--create-bucket"]) == 0
    capsys.readouterr()

    corrupt = bank.block_keys(2)[2]
    flip_disk_copy(tmp_path, bank, corrupt)
    assert run_cli(verify) == 1
    out = capsys.readouterr().out
    assert f"disk: corrupt {corrupt} (sha256 does not match the manifest)\n" in out
    assert "verify FAILED" in out

    assert run_cli([*verify, "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"disk: corrupt {corrupt} (sha256 does not match the manifest): repaired" in out
    assert "verify ok, 1 copies repaired from the bank directory" in out
    assert run_cli(verify) == 0
    assert "verify ok in" in capsys.readouterr().out

    flip_disk_copy(tmp_path, bank, corrupt)
    assert run_cli(push) == 0
    out = capsys.readouterr().out
    assert "tier       levels    written  checked  trusted repaired    stale" in out
    assert "0 blocks written, 1 repaired" in out
    assert f"{N_BLOCKS - 1} checked good (sha256)" in out

    new = rebuild(bank, seed=7)
    assert run_cli(push) == 0
    out = capsys.readouterr().out
    assert f"{N_BLOCKS} blocks written, 0 repaired" in out
    assert f"{N_BLOCKS} stale copies (other builds' and unsuffixed names)" in out
    assert "--prune deletes them" in out
    assert run_cli([*push, "--prune"]) == 0
    assert f"deleted {N_BLOCKS} stale copies" in capsys.readouterr().out
    assert run_cli(verify) == 0
    out = capsys.readouterr().out
    assert "stale" not in out.split("\n", 1)[1]  # no stale line after the header
    assert new.manifest.bank_id in out
