"""`hmem bank push` and `verify` against real tiers: LMDB, a directory, and S3 on moto.

Copies in tiers are named after their content (`bank/L1/3.<sha256[:16]>`): a rebuilt bank's
blocks are new names, old builds' copies are stale, and present copies are checked by digest.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.bank import Bank
from server.bank.placement import check_placement, placement_from_flags
from server.bank.push import push_bank, stored_name, verify_bank
from tests.conftest import S3_CREDENTIALS, S3Server
from tests.server.bank.placement import Placed, run_cli, tier_flags
from tiers import ConfigError, Tier, TierWrapper, open_tier
from tiers.base import Buffer

N_BLOCKS = 2 + 4 + 8  # branching 2, levels 1..3


async def push(bank: Bank, placed: Placed, tiers: dict[str, Tier] | None = None) -> dict[str, int]:
    report = await push_bank(bank, tiers or placed.tiers, placed.placement, progress=False)
    t = report.total
    return {"written": t.written, "checked": t.checked, "repaired": t.repaired}


# -- placement from flags -------------------------------------------------------------------------


def test_flags_name_tiers_by_kind_and_share_one_uri(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    config = placement_from_flags(
        [
            f"1=lmdb:{tmp_path / 'flash'}",
            f"1={disk}",  # a level named twice: home, then replica
            f"2=file://{disk}/",  # the same directory spelled another way: one tier
            f"3={tmp_path / 'other'}",
            "3=s3://bucket/prefix",
        ],
        bank_id="tiny",
        levels=3,
        endpoint_url="http://127.0.0.1:9",
        region="eu-west-3",
    )
    assert config.placement == {1: ["flash", "disk"], 2: ["disk"], 3: ["disk2", "cloud"]}
    cloud = config.tiers["cloud"]
    assert cloud.kind == "s3"
    assert (cloud.bucket, cloud.prefix) == ("bucket", "prefix/")
    assert (cloud.endpoint_url, cloud.region) == ("http://127.0.0.1:9", "eu-west-3")
    assert cloud.access_key_id is None  # boto3's chain: the environment


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("4=/data/x", "bank 'tiny' has levels 1..3"),
        ("x=/data/x", "level 'x' is not a number"),
        ("0=/data/x", "level '0' is not a number >= 1"),
        ("1=ftp://host/path", "unsupported scheme"),
        ("1", "expected LEVEL=URI"),
        ("1=", "expected LEVEL=URI"),
        ("1=s3://", "needs a bucket"),
        ("1=s3://ab", "bucket: String should have at least 3 characters"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match="--tier") as info:
        placement_from_flags([flag], bank_id="tiny", levels=3)
    text = str(info.value)
    assert repr(flag) in text
    assert message in text
    assert "\n" not in text


def test_a_level_without_a_tier_is_refused(bank: Bank, tmp_path: Path) -> None:
    config = placement_from_flags([f"1={tmp_path / 'd'}", f"2={tmp_path / 'd'}"], bank_id="tiny")
    with pytest.raises(ConfigError, match="level 3 of bank 'tiny' has blocks but no tier"):
        check_placement(bank.manifest, config.placement, config.tiers.keys())


# -- push -----------------------------------------------------------------------------------------


async def test_push_puts_every_block_in_its_home_and_again_writes_nothing(
    bank: Bank, placed: Placed
) -> None:
    report = await push_bank(bank, placed.tiers, placed.placement, progress=False)
    assert {n: (t.written, t.checked) for n, t in report.tiers.items()} == {
        "flash": (2, 0),
        "disk": (4, 0),
        "cloud": (8, 0),
    }
    assert report.total.bytes_written == sum(e.bytes for e in bank.manifest.blocks.values())
    for key in bank.block_keys():
        name = stored_name(bank, key)
        assert name == f"{key}.{bank.manifest.blocks[str(key)].sha256[:16]}"
        assert await placed.home(key.level).get(name) == bank.block_bytes(key)
    # Nothing lands outside its level's home.
    assert {k for k, _ in await placed.tiers["flash"].scan()} == {
        stored_name(bank, k) for k in bank.block_keys(1)
    }

    # Again: every copy is read back and its sha256 checked; nothing is written.
    assert await push(bank, placed) == {"written": 0, "checked": N_BLOCKS, "repaired": 0}


async def test_push_copies_to_replicas_too(bank: Bank, tmp_path: Path) -> None:
    flags = [f"1=lmdb:{tmp_path / 'flash'}", f"1={tmp_path / 'disk'}"]
    flags += [f"{level}={tmp_path / 'disk'}" for level in (2, 3)]
    config = placement_from_flags(flags, bank_id="tiny", levels=3)
    tiers = {name: open_tier(name, s) for name, s in config.tiers.items()}
    try:
        report = await push_bank(bank, tiers, config.placement, concurrency=3, progress=False)
        assert (report.tiers["flash"].written, report.tiers["disk"].written) == (2, N_BLOCKS)
        for key in bank.block_keys(1):
            assert await tiers["disk"].get(stored_name(bank, key)) == bank.block_bytes(key)
    finally:
        for tier in tiers.values():
            await tier.aclose()


class PutBudget:
    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.started = 0
        self.done = 0
        self.reached = asyncio.Event()


class StallingTier(TierWrapper):
    """Lets `budget.allowed` puts through, then stalls every later put until cancelled."""

    def __init__(self, inner: Tier, budget: PutBudget) -> None:
        super().__init__(inner)
        self.budget = budget

    async def put(self, key: str, data: Buffer) -> None:
        if self.budget.started >= self.budget.allowed:
            await asyncio.Event().wait()  # never set: the push hangs here until cancelled
        self.budget.started += 1
        await super().put(key, data)
        self.budget.done += 1
        if self.budget.done == self.budget.allowed:
            self.budget.reached.set()


async def test_an_interrupted_push_resumes_and_completes(bank: Bank, placed: Placed) -> None:
    budget = PutBudget(allowed=5)
    stalling: dict[str, Tier] = {n: StallingTier(t, budget) for n, t in placed.tiers.items()}
    task = asyncio.create_task(push(bank, placed, stalling))
    await budget.reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await push(bank, placed) == {"written": N_BLOCKS - 5, "checked": 5, "repaired": 0}
    report = await verify_bank(bank, placed.tiers, placed.placement, progress=False)
    assert report.ok


async def test_push_rewrites_a_block_of_the_wrong_size(bank: Bank, placed: Placed) -> None:
    short, good = bank.block_keys(2)[:2]
    await placed.home(2).put(stored_name(bank, short), b"torn")
    await placed.home(2).put(stored_name(bank, good), bank.block_bytes(good))
    report = await push_bank(bank, placed.tiers, placed.placement, progress=False)
    disk = report.tiers["disk"]
    assert (disk.written, disk.checked, disk.repaired) == (2, 1, 1)
    assert await placed.home(2).get(stored_name(bank, short)) == bank.block_bytes(short)


async def test_push_to_a_missing_bucket_says_to_create_it(
    bank: Bank, tmp_path: Path, s3_server: S3Server, aws_env: None
) -> None:
    p = Placed(bank, tier_flags(tmp_path, "never-created"), s3_server)
    try:
        with pytest.raises(ConfigError, match=r"bucket 'never-created' does not exist.*--create"):
            await push_bank(bank, p.tiers, p.placement, progress=False)
    finally:
        await p.aclose()


# -- verify ---------------------------------------------------------------------------------------


async def test_verify_passes_then_names_missing_and_corrupt_blocks(
    bank: Bank, placed: Placed
) -> None:
    await push(bank, placed)
    report = await verify_bank(bank, placed.tiers, placed.placement, progress=False)
    assert report.ok
    assert {n: t.ok for n, t in report.tiers.items()} == {"flash": 2, "disk": 4, "cloud": 8}

    gone, bad_size = bank.block_keys(3)[1], bank.block_keys(3)[5]
    tampered = bank.block_keys(1)[0]
    assert await placed.home(3).delete(stored_name(bank, gone))
    await placed.home(3).put(stored_name(bank, bad_size), b"not a block")
    flipped = bytearray(bank.block_bytes(tampered))
    flipped[-1] ^= 0xFF  # same size, different content
    await placed.home(1).put(stored_name(bank, tampered), flipped)

    report = await verify_bank(bank, placed.tiers, placed.placement, progress=False)
    assert not report.ok
    cloud, flash = report.tiers["cloud"], report.tiers["flash"]
    assert cloud.missing == [str(gone)]
    assert list(cloud.corrupt) == [str(bad_size)]
    assert "11 bytes, the manifest says" in cloud.corrupt[str(bad_size)]
    assert cloud.ok == 6
    assert flash.corrupt == {str(tampered): "sha256 does not match the manifest"}
    assert report.tiers["disk"].good


# -- the CLI commands -----------------------------------------------------------------------------


def test_cli_push_creates_the_bucket_then_verify_finds_a_corrupt_block(
    bank: Bank,
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    aws_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = [f"--tier={flag}" for flag in tier_flags(tmp_path, s3_bucket)]
    s3 = ["--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1"]
    push_argv = ["bank", "push", str(bank.path), *flags, *s3, "--no-progress"]

    assert run_cli(push_argv) == 2
    assert "does not exist; create it first" in capsys.readouterr().err

    assert run_cli([*push_argv, "--create-bucket"]) == 0
    out = capsys.readouterr().out
    assert f"created S3 bucket {s3_bucket!r}" in out
    assert "14 blocks written, 0 repaired" in out
    assert f"s3://{s3_bucket}/banks/" in out
    assert S3_CREDENTIALS["secret_access_key"] not in out

    assert run_cli(push_argv) == 0
    assert "0 blocks written, 0 repaired (0.00 MiB), 14 checked good" in capsys.readouterr().out

    verify_argv = ["bank", "verify", str(bank.path), *flags, *s3, "--no-progress"]
    assert run_cli(verify_argv) == 0
    assert "verify ok" in capsys.readouterr().out

    key = bank.block_keys(2)[3]
    (tmp_path / "disk" / f"{stored_name(bank, key)}.blk").write_bytes(b"x")
    assert run_cli(verify_argv) == 1
    out = capsys.readouterr().out
    assert f"disk: corrupt {key} (1 bytes, the manifest says" in out
    assert "verify FAILED" in out


def test_cli_push_and_verify_with_a_settings_file(
    bank: Bank, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "hmem.toml"
    settings.write_text(
        f"""
[store.tiers.nvme]
kind = "lmdb"
path = "{tmp_path / "flash"}"
[store.tiers.hdd]
kind = "disk"
root = "{tmp_path / "disk"}"
fsync = false
[store.placement]
1 = "nvme"
2 = "hdd"
3 = ["hdd", "nvme"]
"""
    )
    assert run_cli(["bank", "push", str(bank.path), "--config", str(settings)]) == 0
    out = capsys.readouterr().out
    assert "nvme       1,3" in out
    assert "hdd        2,3" in out
    assert run_cli(["bank", "verify", str(bank.path), "--config", str(settings)]) == 0
    assert "verify ok" in capsys.readouterr().out


def test_cli_without_a_placement_uses_the_embedded_default(
    bank: Bank, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --tier, no [store]: the tiers `hmem serve` would use, under HMEM_DATA_DIR."""
    monkeypatch.setenv("HMEM_DATA_DIR", str(tmp_path / "state"))
    assert run_cli(["bank", "push", str(bank.path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "14 blocks written" in out
    assert f"lmdb:{tmp_path / 'state' / 'tiers' / 'flash.lmdb'}" in out
    assert run_cli(["bank", "verify", str(bank.path), "--no-progress"]) == 0
    assert "verify ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tier", "4=d"], "--tier '4=d': bank 'tiny' has levels 1..3"),
        (["--tier", "1=ftp://host/x"], "unsupported scheme"),
        (["--tier", "1=d"], "level 2 of bank 'tiny' has blocks but no tier"),
        (["--config", "missing.toml"], "settings file missing.toml does not exist"),
        (["--tier", "1=d", "--config", "x.toml"], "--tier flags or --config, not both"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    bank: Bank,
    extra: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli(["bank", "verify", str(bank.path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hmem: error: ")
    assert message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "d").exists()  # refused before any tier was opened


def test_cli_missing_bank_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["bank", "push", str(tmp_path / "nope"), "--tier", f"1={tmp_path}"]) == 2
    assert "hmem: error: bank is missing its directory" in capsys.readouterr().err
