"""`hmem bank generate` at the small shape, into real tiers: LMDB, directories and S3 (rclone).

A generated bank keeps every block in the tiers of its level and none in its directory; the same
seed gives the same bank whatever the tiers; an interrupted generation (Ctrl-C) resumes to that
same bank; a finished one is left alone, and an unfinished one is never continued with other
arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr

from server.bank import Bank
from server.bank.errors import BankFileMissingError
from server.bank.generate import JOURNAL, PLAN, SERVE_SETTINGS, GenerateReport, generate_bank
from server.bank.placement import placement_from_flags
from server.bank.shapes import SHAPES
from server.model.checkpoint import load_anchor
from server.settings import load_settings
from server.tokenizer import AnchorTokenizer
from tiers import ConfigError, StoreConfig, Tier, open_tier
from tiers.config import S3TierSettings
from tiers.keys import BlockKey, storage_key
from tiers.rclone_server import RcloneS3Server

SMALL = SHAPES["small"]
N_BLOCKS = 4 + 16 + 64 + 256
SMALL_FILES = [
    "anchor/config.json",
    "anchor/model.safetensors",
    "anchor/tokenizer.json",
    "anchor/tokenizer_config.json",
    "generate.json",
    "generic/L1.safetensors",
    "generic/L2.safetensors",
    "generic/L3.safetensors",
    "generic/L4.safetensors",
    "manifest.json",
    "router.safetensors",
    "serve.json",
]
# What a finished generation writes, in its directory, beyond its blocks (which it never writes
# there): the same bytes for the same seed.
SAME_FOR_SAME_SEED = [f for f in SMALL_FILES if f not in ("generate.json", "serve.json")]
INTERRUPTED_HINT = "hmem: interrupted; run the same command again to resume"


@dataclass(frozen=True)
class S3:
    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class Generated:
    bank: Path
    config: StoreConfig
    report: GenerateReport


@contextmanager
def s3_in_environment(client: Mapping[str, str], empty: Path) -> Iterator[S3]:
    """The S3 server's credentials in the environment, as boto3 reads them, no profile files."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", client["access_key_id"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", client["secret_access_key"])
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        yield S3(**client)


@pytest.fixture(scope="module")
def s3(rclone_s3: RcloneS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """`rclone serve s3` over loopback, its credentials in the environment."""
    with s3_in_environment(rclone_s3.client_settings(), tmp_path_factory.mktemp("no-aws")) as s3:
        yield s3


def paper_flags(root: Path, bucket: str) -> list[str]:
    """The paper's placement, scaled down: L1 on LMDB, L2 and L3 on one directory, L4 on S3."""
    return [
        f"1=lmdb:{root / 'flash'}",
        f"2={root / 'disk'}",
        f"3={root / 'disk'}",
        f"4=s3://{bucket}/banks",
    ]


def store(flags: Sequence[str], s3: S3) -> StoreConfig:
    return placement_from_flags(
        flags, bank_id="small", levels=4, endpoint_url=s3.endpoint_url, region=s3.region
    )


def generate(out: Path, config: StoreConfig, *, seed: int = 0) -> GenerateReport:
    """`generate_bank` of the small shape, on a loop of its own (module fixtures have none)."""
    return asyncio.run(generate_bank(out, SMALL, config, seed=seed, progress=False))


@pytest.fixture(scope="module")
def fresh(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Generated:
    """The small shape generated once, seed 0, in the paper's placement."""
    root = tmp_path_factory.mktemp("fresh")
    config = store(paper_flags(root, "generate-fresh"), s3)
    report = generate(root / "bank", config)
    return Generated(root / "bank", config, report)


@asynccontextmanager
async def opened(config: StoreConfig) -> AsyncIterator[dict[str, Tier]]:
    tiers: dict[str, Tier] = {}
    try:
        for name, settings in config.tiers.items():
            tiers[name] = open_tier(name, settings)
        yield tiers
    finally:
        for tier in tiers.values():
            await tier.aclose()


async def stored_copies(bank: Bank, config: StoreConfig) -> dict[BlockKey, bytes]:
    """Every block's copy read back from its level's home tier, checked against the manifest."""
    copies: dict[BlockKey, bytes] = {}
    async with opened(config) as tiers:
        for level in range(1, bank.manifest.levels + 1):
            keys = bank.block_keys(level)
            names = [storage_key(k, bank.manifest.blocks[str(k)].sha256) for k in keys]
            home = tiers[config.placement[level][0]]
            for key, name, data in zip(keys, names, await home.get_many(names), strict=True):
                assert data is not None, f"{name} is not in tier {config.placement[level][0]}"
                entry = bank.manifest.blocks[str(key)]
                assert len(data) == entry.bytes, key
                assert hashlib.sha256(data).hexdigest() == entry.sha256, key
                copies[key] = data
    return copies


def with_credentials(config: StoreConfig, s3: S3) -> StoreConfig:
    """`config` with the S3 credentials written in its tier settings."""
    secrets = {
        "access_key_id": SecretStr(s3.access_key_id),
        "secret_access_key": SecretStr(s3.secret_access_key),
    }
    tiers = {
        name: t.model_copy(update=secrets) if isinstance(t, S3TierSettings) else t
        for name, t in config.tiers.items()
    }
    return config.model_copy(update={"tiers": tiers})


def tensor_bytes(block: bytes) -> int:
    """Bytes of tensor data in a safetensors blob: all of it less its 8-byte length and header."""
    header = int.from_bytes(block[:8], "little")
    return len(block) - 8 - header


def bank_files(bank: Path) -> list[str]:
    return sorted(p.relative_to(bank).as_posix() for p in bank.rglob("*") if p.is_file())


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def journal_lines(bank: Path) -> int:
    path = bank / JOURNAL
    return len(path.read_text().splitlines()) if path.is_file() else 0


_SIZE_RE = re.compile(r"([0-9.]+) (B|kB|KB|MB|GB|TB)\b")
_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def printed_size(text: str) -> tuple[float, float]:
    """A size as `summary()` prints it ("0.147 MB"): (bytes, half its last printed digit)."""
    m = _SIZE_RE.fullmatch(text.strip())
    assert m is not None, text
    number, unit = m.groups()
    decimals = len(number.partition(".")[2])
    return float(number) * _UNITS[unit], 0.5 * 10**-decimals * _UNITS[unit]


def level_lines(summary: str) -> dict[int, tuple[int, str]]:
    """level -> (blocks, its size as printed) from the summary's per-level lines."""
    out = {}
    for line in summary.splitlines():
        m = re.fullmatch(r"\s*L(\d+):\s+(\d+) blocks x .*=\s*(.+)", line)
        if m is not None:
            out[int(m[1])] = (int(m[2]), m[3])
    return out


# -- a fresh generation ---------------------------------------------------------------------------


async def test_every_block_lives_in_its_levels_tier_and_none_in_the_bank_directory(
    fresh: Generated,
) -> None:
    bank = Bank.open(fresh.bank, check_files=False)
    m = bank.manifest
    assert (m.bank_id, m.levels, m.branching, list(m.widths), m.dtype) == (
        "small", 4, 4, [32, 16, 8, 4], "bfloat16",
    )  # fmt: skip
    assert set(m.blocks) == {
        str(BlockKey("small", level, node))
        for level in range(1, 5)
        for node in range(SMALL.n_nodes(level))
    }
    assert len(m.blocks) == N_BLOCKS
    # The directory holds the small files only: a bank whose blocks are in tiers alone.
    assert bank_files(fresh.bank) == SMALL_FILES
    with pytest.raises(BankFileMissingError, match="a block"):
        Bank.open(fresh.bank)

    copies = await stored_copies(bank, fresh.config)
    assert len(copies) == N_BLOCKS
    # Each tier holds its levels' blocks and nothing else.
    expected: dict[str, set[str]] = {name: set() for name in fresh.config.tiers}
    for key in copies:
        (home,) = fresh.config.placement[key.level]
        expected[home].add(storage_key(key, m.blocks[str(key)].sha256))
    async with opened(fresh.config) as tiers:
        for name, tier in tiers.items():
            assert {n for n, _ in await tier.scan()} == expected[name], name
    assert {name: len(names) for name, names in expected.items()} == {
        "flash": 4, "disk": 16 + 64, "cloud": 256,
    }  # fmt: skip

    # What was written is what is stored: per level, blocks, bytes, and the shape's tensor bytes.
    r = fresh.report
    assert (r.written, r.resumed, r.complete) == ({1: 4, 2: 16, 3: 64, 4: 256}, 0, False)
    assert r.bytes_written == sum(len(b) for b in copies.values())
    summary = level_lines(SMALL.summary())
    for level in range(1, 5):
        blobs = [b for k, b in copies.items() if k.level == level]
        assert sum(len(b) for b in blobs) == sum(
            e.bytes for k, e in m.blocks.items() if BlockKey.parse(k).level == level
        )
        tensors = sum(tensor_bytes(b) for b in blobs)
        assert tensors == SMALL.level_bytes(level) == len(blobs) * SMALL.block_bytes(level)
        blocks, size = summary[level]
        value, half_digit = printed_size(size)
        assert blocks == len(blobs)
        assert abs(value - tensors) <= half_digit, (level, size, tensors)


def test_the_anchor_and_tokenizer_load_and_serve_json_serves_the_bank_from_its_tiers(
    fresh: Generated,
) -> None:
    anchor = fresh.bank / "anchor"
    # The serving user reads the weights as it reads the rest (safetensors' own writer makes
    # its files private).
    assert (
        mode(anchor / "model.safetensors")
        == mode(anchor / "config.json")
        == mode(fresh.bank / "manifest.json")
    )
    model = load_anchor(anchor, dtype=torch.bfloat16)
    assert model.config == SMALL.anchor
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tok = AnchorTokenizer.from_dir(anchor, model.config)
    assert tok.vocab_size == SMALL.tokenizer_vocab
    text = "def main(argv):\n    return sorted(argv)\n"
    ids = tok.encode(text)
    assert ids[0] == SMALL.anchor.bos_token_id
    assert len(ids) < len(text) // 2  # learned merges, not bytes
    assert tok.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids]))  # [1, T, vocab]
    assert logits.shape == (1, len(ids), SMALL.anchor.vocab_size)
    assert bool(torch.isfinite(logits).all())

    settings = load_settings(config_file=fresh.bank / SERVE_SETTINGS)
    assert settings.bank == fresh.bank.resolve()
    assert settings.dtype == "bfloat16"
    assert settings.store is not None
    assert settings.store.placement == fresh.config.placement
    assert settings.store.tiers == fresh.config.tiers


def test_a_finished_bank_is_left_alone(fresh: Generated) -> None:
    before = {f: (fresh.bank / f).read_bytes() for f in SMALL_FILES}
    report = generate(fresh.bank, fresh.config)
    assert report.complete
    assert (report.written, report.resumed, report.bytes_written) == ({}, 0, 0)
    assert {f: (fresh.bank / f).read_bytes() for f in SMALL_FILES} == before


# -- refusals -------------------------------------------------------------------------------------


def test_an_unfinished_generation_is_continued_only_with_its_own_arguments(
    fresh: Generated, tmp_path: Path
) -> None:
    """A directory holding only `generate.json` is a generation stopped right after it began."""
    out = tmp_path / "bank"
    out.mkdir()
    (out / PLAN).write_bytes((fresh.bank / PLAN).read_bytes())

    with pytest.raises(ConfigError, match=r"different seed \(0, now 1\)") as info:
        generate(out, fresh.config, seed=1)
    assert "run it with the same arguments to resume" in str(info.value)
    with pytest.raises(ConfigError, match=r"different shape \('small', now 'paper-160m'\)"):
        asyncio.run(generate_bank(out, SHAPES["paper-160m"], fresh.config, progress=False))
    other_disk = placement_from_flags(
        [f"{level}={tmp_path / 'elsewhere'}" for level in range(1, 5)], bank_id="small", levels=4
    )
    with pytest.raises(ConfigError, match="different placement"):
        generate(out, other_disk)
    assert bank_files(out) == [PLAN]  # nothing was written


def test_a_level_without_a_tier_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    config = placement_from_flags(
        [f"1=lmdb:{tmp_path / 'flash'}", f"2={tmp_path / 'disk'}", f"3={tmp_path / 'disk'}"],
        bank_id="small",
    )
    with pytest.raises(ConfigError, match=r"levels \[4\] have no tier: add --tier LEVEL=URI"):
        generate(tmp_path / "bank", config)
    assert not (tmp_path / "bank").exists()
    assert not (tmp_path / "flash").exists()


# -- the command line -----------------------------------------------------------------------------


def hmem(*argv: str, stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    """`hmem ARGV` in a child process, with Python's Ctrl-C handler even if this process was
    started in the background (where a shell without job control makes children ignore SIGINT)."""
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from server.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    with stdout.open("wb") as out, stderr.open("wb") as err:
        return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=out, stderr=err)


def generate_argv(out: Path, flags: Sequence[str], s3: S3, *extra: str) -> list[str]:
    tiers = [arg for flag in flags for arg in ("--tier", flag)]
    return [
        "bank", "generate", str(out), "--shape", "small", *tiers,
        "--endpoint-url", s3.endpoint_url, "--region", s3.region, "--no-progress", *extra,
    ]  # fmt: skip


def assert_same_bank(bank: Path, fresh: Generated) -> None:
    for name in SAME_FOR_SAME_SEED:
        assert (bank / name).read_bytes() == (fresh.bank / name).read_bytes(), name


@pytest.mark.slow
def test_the_command_writes_the_bank_the_same_seed_always_writes(
    fresh: Generated, s3: S3, tmp_path: Path
) -> None:
    """Other tiers, another directory, the command line: the same manifest, anchor and router."""
    out = tmp_path / "bank"
    flags = [
        f"1={tmp_path / 'one'}",
        f"2=lmdb:{tmp_path / 'flash'}",
        "3=s3://generate-cli/other/prefix",
        f"4={tmp_path / 'four'}",
    ]
    proc = hmem(
        *generate_argv(out, flags, s3), stdout=tmp_path / "stdout", stderr=tmp_path / "stderr"
    )
    assert proc.wait(timeout=120) == 0, (tmp_path / "stderr").read_text()
    stdout = (tmp_path / "stdout").read_text()

    # The shape's sizes per level, where each level goes, what was written, how to serve it.
    summary = SMALL.summary()
    assert stdout.startswith(summary + "\n")
    assert level_lines(stdout) == level_lines(summary)
    assert "  L3 -> s3://generate-cli/other/prefix/" in stdout
    assert f"wrote {N_BLOCKS} blocks " in stdout
    assert "; 0 were already written\n" in stdout
    assert stdout.endswith(f"serve it: hmem serve --config {out}/{SERVE_SETTINGS}\n")

    assert bank_files(out) == SMALL_FILES
    assert_same_bank(out, fresh)
    config = store(flags, s3)
    assert len(asyncio.run(stored_copies(Bank.open(out, check_files=False), config))) == N_BLOCKS


@pytest.mark.slow
def test_an_interrupted_generation_resumes_to_the_same_bank(
    fresh: Generated, s3: S3, tmp_path: Path
) -> None:
    """Ctrl-C mid-way (one block at a time), then the same arguments again: the bank of a run
    that was never interrupted, with the journal's blocks not made again."""
    out = tmp_path / "bank"
    flags = paper_flags(tmp_path, "generate-resumed")
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    proc = hmem(*generate_argv(out, flags, s3, "--concurrency", "1"), stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while journal_lines(out) < 40:  # levels 1 and 2 and some of 3
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, stderr.read_text()
    finally:
        proc.kill()
        proc.wait()
    err = stderr.read_text()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == INTERRUPTED_HINT
    assert not (out / "manifest.json").exists()  # unfinished
    journalled = {json.loads(line)["key"] for line in (out / JOURNAL).read_text().splitlines()}
    assert 40 <= len(journalled) < N_BLOCKS

    # Resumed with the credentials in the settings rather than the environment: the same plan.
    report = generate(out, with_credentials(store(flags, s3), s3))
    assert report.resumed == len(journalled)
    assert sum(report.written.values()) == N_BLOCKS - len(journalled)
    assert not report.complete
    assert bank_files(out) == SMALL_FILES  # the journal is gone with the generation done
    assert_same_bank(out, fresh)
    copies = asyncio.run(stored_copies(Bank.open(out, check_files=False), store(flags, s3)))
    assert len(copies) == N_BLOCKS
    # serve.json names the tiers, never the credentials (boto3 finds them as it found them here).
    text = (out / SERVE_SETTINGS).read_text()
    assert s3.access_key_id not in text
    assert s3.secret_access_key not in text
    assert "access_key" not in text
    settings = load_settings(config_file=out / SERVE_SETTINGS)
    assert settings.store == store(flags, s3)
