"""`hmem bank push` and `hmem bank verify`: a bank's blocks copied to, and checked in, their tiers.

A placement says which tiers hold each level (home first, then replicas); it comes from
`--tier LEVEL=URI` flags (`placement_from_flags`) or from the `[store]` settings. `push_bank`
copies every block to every tier of its level's placement. It is idempotent and resumable: each
target tier is listed once, a key already there with the right size is skipped (tier writes are
atomic, so a present key is a complete one), and the rest are written with a bounded number of
puts in flight. `verify_bank` reads every block back from its tiers and checks its size and
sha256 against the manifest, naming the missing and corrupt keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from botocore.exceptions import ClientError
from pydantic import ValidationError
from tqdm import tqdm

from server.bank.manifest import BankManifest
from server.bank.reader import Bank
from tiers.base import Tier
from tiers.config import (
    DiskTierSettings,
    LmdbTierSettings,
    S3TierSettings,
    StoreConfig,
    tier_from_uri,
)
from tiers.errors import ConfigError, TierUnavailableError
from tiers.keys import BlockKey
from tiers.s3 import S3Tier

X = TypeVar("X")
AnyTierSettings = LmdbTierSettings | DiskTierSettings | S3TierSettings
TIER_NAMES = {"lmdb": "flash", "disk": "disk", "s3": "cloud"}  # tier kind -> name in flags mode
_LEVEL_RE = re.compile(r"[1-9][0-9]*")

# -- placement ------------------------------------------------------------------------------------


def placement_from_flags(
    tier_flags: Sequence[str],
    *,
    bank_id: str,
    levels: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> StoreConfig:
    """A `StoreConfig` from `LEVEL=URI` flags (`1=lmdb:/data/flash`, `3=s3://bucket/prefix`).

    One URI named for several levels is one shared tier; a level named twice gets a home and a
    replica, in flag order. Tiers are named after their kind (`flash`, `disk`, `cloud`, then
    `disk2`, ...). S3 tiers get `endpoint_url` and `region`; credentials come from boto3's chain
    (AWS_ACCESS_KEY_ID etc.). With `levels`, a level past the bank's last is refused. Every
    mistake is a one-line `ConfigError` (a `ValueError`) naming the flag.
    """
    if not tier_flags:
        raise ConfigError("no tiers given: add --tier LEVEL=URI for each level of the bank")
    tiers: dict[str, AnyTierSettings] = {}
    placement: dict[int, list[str]] = {}
    for flag in tier_flags:
        level_text, sep, uri = flag.partition("=")
        level_text, uri = level_text.strip(), uri.strip()
        if not sep or not uri:
            raise ConfigError(f"--tier {flag!r}: expected LEVEL=URI, as in 1=lmdb:/data/flash")
        if _LEVEL_RE.fullmatch(level_text) is None:
            raise ConfigError(f"--tier {flag!r}: level {level_text!r} is not a number >= 1")
        level = int(level_text)
        if levels is not None and level > levels:
            raise ConfigError(f"--tier {flag!r}: bank {bank_id!r} has levels 1..{levels} only")
        settings = _tier_settings(flag, uri, endpoint_url=endpoint_url, region=region)
        name = next((n for n, s in tiers.items() if s == settings), None)
        if name is None:
            name = _fresh_name(TIER_NAMES[settings.kind], tiers)
            tiers[name] = settings
        names = placement.setdefault(level, [])
        if name in names:
            raise ConfigError(f"--tier {flag!r}: level {level} already has this tier")
        names.append(name)
    try:
        return StoreConfig.model_validate({"tiers": tiers, "placement": placement})
    except ValidationError as exc:  # pragma: no cover - the flags above are checked already
        raise ConfigError(f"--tier: {_one_line(exc)}") from None


def _tier_settings(
    flag: str, uri: str, *, endpoint_url: str | None, region: str | None
) -> AnyTierSettings:
    extra = {"endpoint_url": endpoint_url, "region": region} if uri.startswith("s3://") else {}
    try:
        settings = tier_from_uri(uri, **extra)
    except ConfigError as exc:
        raise ConfigError(f"--tier {flag!r}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"--tier {flag!r}: {_one_line(exc)}") from None
    # Normalised so that two spellings of one place (`./d`, `/abs/d`; `p`, `p/`) are one tier.
    if isinstance(settings, LmdbTierSettings):
        return settings.model_copy(update={"path": settings.path.expanduser().resolve()})
    if isinstance(settings, DiskTierSettings):
        return settings.model_copy(update={"root": settings.root.expanduser().resolve()})
    prefix = settings.prefix.strip("/")
    return settings.model_copy(update={"prefix": f"{prefix}/" if prefix else ""})


def _fresh_name(base: str, taken: Mapping[str, object]) -> str:
    n = 1
    while (name := base if n == 1 else f"{base}{n}") in taken:
        n += 1
    return name


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}"
        for e in exc.errors(include_url=False)
    )


def tier_location(settings: AnyTierSettings) -> str:
    """Where a tier is, as a URI without credentials or endpoint (for summaries)."""
    if isinstance(settings, LmdbTierSettings):
        return f"lmdb:{settings.path}"
    if isinstance(settings, DiskTierSettings):
        return str(settings.root)
    return f"s3://{settings.bucket}/{settings.prefix}"


def check_placement(
    manifest: BankManifest,
    placement: Mapping[int, Sequence[str]],
    tier_names: Collection[str],
    *,
    every_level: bool = True,
) -> None:
    """Every level with blocks has a tier, no level is past the bank's last, every tier is known.

    Checked before any tier is opened (the CLI) and again by `push_bank` and `verify_bank`.
    """
    for level, names in sorted(placement.items()):
        if not 1 <= level <= manifest.levels:
            raise ConfigError(
                f"placement.{level}: bank {manifest.bank_id!r} has levels 1..{manifest.levels}"
            )
        if not names:
            raise ConfigError(f"placement.{level}: name at least one tier")
        for name in names:
            if name not in tier_names:
                raise ConfigError(f"placement.{level}: unknown tier {name!r}")
    levels_with_blocks = sorted({BlockKey.parse(k).level for k in manifest.blocks})
    for level in levels_with_blocks if every_level else ():
        if level not in placement:
            raise ConfigError(
                f"level {level} of bank {manifest.bank_id!r} has blocks but no tier: "
                f"add --tier {level}=URI (or placement.{level} in the settings)"
            )


def _targets(bank: Bank, placement: Mapping[int, Sequence[str]]) -> list[tuple[BlockKey, str]]:
    """(key, tier name) for every block and every tier of its level, in (level, node) order."""
    return [(key, name) for key in bank.block_keys() for name in placement.get(key.level, ())]


def _missing_bucket(tier: Tier, exc: TierUnavailableError) -> ConfigError | None:
    """A clear error when `exc` is S3's NoSuchBucket (the tier keeps the SDK error as cause)."""
    cause = exc.__cause__
    if not (isinstance(cause, ClientError) and isinstance(tier, S3Tier)):
        return None
    if cause.response.get("Error", {}).get("Code") != "NoSuchBucket":
        return None
    return ConfigError(
        f"tier {tier.name!r}: S3 bucket {tier.bucket!r} does not exist; create it first "
        "(hmem bank push --create-bucket, or your S3 console)"
    )


async def _bounded(items: Iterable[X], work: Callable[[X], Awaitable[None]], n: int) -> None:
    """Run `work` on every item with at most `n` in flight; the first error cancels the rest."""
    if n < 1:
        raise ValueError(f"concurrency must be >= 1, got {n}")
    it = iter(items)

    async def worker() -> None:
        for item in it:  # shared iterator: each item goes to exactly one worker
            await work(item)

    workers = [asyncio.create_task(worker()) for _ in range(n)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def _bar(total: int, desc: str, progress: bool) -> tqdm[NoReturn]:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress or not sys.stderr.isatty(),
    )


# -- push -----------------------------------------------------------------------------------------


@dataclass
class TierPush:
    """What a push did to one tier."""

    written: int = 0
    skipped: int = 0  # already there with the right size
    bytes_written: int = 0


@dataclass
class PushReport:
    tiers: dict[str, TierPush] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return sum(t.written for t in self.tiers.values())

    @property
    def skipped(self) -> int:
        return sum(t.skipped for t in self.tiers.values())

    @property
    def bytes_written(self) -> int:
        return sum(t.bytes_written for t in self.tiers.values())


async def _listing(tier: Tier) -> dict[str, int]:
    try:
        return dict(await tier.scan())
    except TierUnavailableError as exc:
        if (clear := _missing_bucket(tier, exc)) is not None:
            raise clear from exc
        raise


async def push_bank(
    bank: Bank,
    store_tiers: Mapping[str, Tier],
    placement: Mapping[int, Sequence[str]],
    *,
    concurrency: int = 8,
    progress: bool = True,
    some_levels: bool = False,
) -> PushReport:
    """Copy every block of `bank` to every tier of its level's placement; skip what is there.

    `some_levels=True` accepts a placement that leaves levels out (their blocks are not copied).

    Each block is read once from the bank (sha256-checked, on a worker thread) and written to
    the tiers that lack it, one put at a time, with at most `concurrency` blocks in flight.
    Interrupted, it leaves only complete blocks behind; run it again to finish.
    """
    check_placement(bank.manifest, placement, store_tiers.keys(), every_level=not some_levels)
    started = time.perf_counter()
    names = list(dict.fromkeys(n for level in sorted(placement) for n in placement[level]))
    listings = await asyncio.gather(*(_listing(store_tiers[n]) for n in names))
    present = dict(zip(names, listings, strict=True))
    report = PushReport(tiers={n: TierPush() for n in names})

    needed: dict[BlockKey, list[str]] = {}
    for key, name in _targets(bank, placement):
        if present[name].get(str(key)) == bank.manifest.blocks[str(key)].bytes:
            report.tiers[name].skipped += 1
        else:
            needed.setdefault(key, []).append(name)
    total = sum(bank.manifest.blocks[str(k)].bytes * len(ns) for k, ns in needed.items())

    desc = f"push {bank.manifest.bank_id} ({len(needed)} blocks)"
    with _bar(total, desc, progress) as bar:

        async def copy(item: tuple[BlockKey, list[str]]) -> None:
            key, targets = item
            data = await asyncio.to_thread(bank.block_bytes, key)
            for name in targets:
                await store_tiers[name].put(str(key), data)
                counts = report.tiers[name]
                counts.written += 1
                counts.bytes_written += len(data)
                bar.update(len(data))

        await _bounded(needed.items(), copy, concurrency)
    report.seconds = time.perf_counter() - started
    return report


# -- verify ---------------------------------------------------------------------------------------


@dataclass
class TierVerify:
    """What one tier holds of the bank: good blocks, missing keys, corrupt keys (with why)."""

    ok: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def good(self) -> bool:
        return not self.missing and not self.corrupt


@dataclass
class VerifyReport:
    tiers: dict[str, TierVerify] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(t.good for t in self.tiers.values())


def _size_and_sha256(view: memoryview) -> tuple[int, str]:
    # Runs on the tier's worker thread, over the tier's own buffer (an LMDB page: no copy).
    return view.nbytes, hashlib.sha256(view).hexdigest()


async def verify_bank(
    bank: Bank,
    store_tiers: Mapping[str, Tier],
    placement: Mapping[int, Sequence[str]],
    *,
    concurrency: int = 8,
    progress: bool = True,
) -> VerifyReport:
    """Read every block from every tier of its level and check its size and sha256."""
    check_placement(bank.manifest, placement, store_tiers.keys())
    started = time.perf_counter()
    targets = _targets(bank, placement)
    report = VerifyReport(tiers={n: TierVerify() for _, n in targets})
    blocks = bank.manifest.blocks
    total = sum(blocks[str(key)].bytes for key, _ in targets)

    desc = f"verify {bank.manifest.bank_id} ({len(targets)} blocks)"
    with _bar(total, desc, progress) as bar:

        async def check(item: tuple[BlockKey, str]) -> None:
            key, name = item
            tier, entry = store_tiers[name], blocks[str(key)]
            try:
                got = await tier.read(str(key), _size_and_sha256)
            except TierUnavailableError as exc:
                if (clear := _missing_bucket(tier, exc)) is not None:
                    raise clear from exc
                raise
            counts = report.tiers[name]
            if got is None:
                counts.missing.append(str(key))
            elif got[0] != entry.bytes:
                counts.corrupt[str(key)] = f"{got[0]} bytes, the manifest says {entry.bytes}"
            elif got[1] != entry.sha256:
                counts.corrupt[str(key)] = "sha256 does not match the manifest"
            else:
                counts.ok += 1
            bar.update(entry.bytes)

        await _bounded(targets, check, concurrency)
    for counts in report.tiers.values():  # workers finish out of order
        counts.missing.sort(key=_key_order)
        counts.corrupt = dict(sorted(counts.corrupt.items(), key=lambda kv: _key_order(kv[0])))
    report.seconds = time.perf_counter() - started
    return report


def _key_order(key: str) -> BlockKey:
    return BlockKey.parse(key)


__all__ = [
    "TIER_NAMES",
    "PushReport",
    "TierPush",
    "TierVerify",
    "VerifyReport",
    "check_placement",
    "placement_from_flags",
    "push_bank",
    "tier_location",
    "verify_bank",
]
