"""`hmem bank push` and `hmem bank verify`: a bank's blocks copied to, and checked in, their tiers.

A placement says which tiers hold each level (home first, then replicas; `server.bank.placement`
reads it from `--tier LEVEL=URI` flags or the `[store]` settings). In a tier, a
block's copy is named after its content (`tiers.keys.storage_key`: `bank/L1/3.<sha256[:16]>`),
so a rebuilt bank's blocks are new names and a copy left by another build is never counted as
present. `push_bank` copies every block to every tier of its level's placement. It is idempotent
and resumable: each target tier is listed once; a copy already there is read back and checked
against the manifest's sha256 (or, with `trust_existing`, taken on its name and size alone); a
missing copy is written and a corrupt one rewritten, with a bounded number of blocks in flight.
Tier writes are atomic (disk: temp file and rename; LMDB: a transaction; S3: one PUT), so an
interrupted push leaves only whole copies. `verify_bank` reads every copy back, names the missing
and corrupt ones, and with `repair` rewrites them from the bank directory. Both list the bank's
stale copies: names of this bank that no block of this build has (an older build's, or unsuffixed
names from before content naming); `push_bank(prune=True)` deletes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from botocore.exceptions import ClientError
from tqdm import tqdm

from server.bank.placement import check_placement
from server.bank.reader import Bank
from tiers.base import Tier
from tiers.errors import ConfigError, InvalidKeyError, TierUnavailableError
from tiers.keys import BlockKey, parse_storage_key, storage_key
from tiers.s3 import S3Tier

X = TypeVar("X")


def _targets(bank: Bank, placement: Mapping[int, Sequence[str]]) -> list[tuple[BlockKey, str]]:
    """(key, tier name) for every block and every tier of its level, in (level, node) order."""
    return [(key, name) for key in bank.block_keys() for name in placement.get(key.level, ())]


def stored_name(bank: Bank, key: BlockKey) -> str:
    """The name of `key`'s copy in a tier: the key and its content (manifest sha256) prefix."""
    return storage_key(key, bank.manifest.blocks[str(key)].sha256)


def stale_names(bank: Bank, listing: Iterable[str]) -> list[str]:
    """Those of a tier's names that are this bank's blocks but no copy of this build's blocks."""
    m = bank.manifest
    current = {storage_key(key, entry.sha256) for key, entry in m.blocks.items()}
    stale = []
    for name in listing:
        if name in current:
            continue
        parsed = parse_storage_key(name)
        if parsed is not None:
            key: BlockKey | None = parsed[0]
        else:
            try:  # an unsuffixed copy, written before tiers named copies after their content
                key = BlockKey.parse(name)
            except InvalidKeyError:
                key = None
        if key is not None and key.bank_id == m.bank_id:
            stale.append(name)
    return sorted(stale)


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


def progress_bar(total: int, desc: str, progress: bool) -> tqdm[NoReturn]:
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

    written: int = 0  # copies that were missing, written
    checked: int = 0  # copies already there, read back: sha256 matches the manifest
    trusted: int = 0  # copies already there with the right size, not read (`trust_existing`)
    repaired: int = 0  # copies already there but corrupt (size or sha256), rewritten
    stale: list[str] = field(default_factory=list)  # this bank's names no block of this build has
    pruned: int = 0
    bytes_written: int = 0


@dataclass
class PushReport:
    tiers: dict[str, TierPush] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total(self) -> TierPush:
        """Every tier's counts added up (and every tier's stale names)."""
        out = TierPush()
        for t in self.tiers.values():
            for name in ("written", "checked", "trusted", "repaired", "pruned", "bytes_written"):
                setattr(out, name, getattr(out, name) + getattr(t, name))
            out.stale += t.stale
        return out


async def _listing(tier: Tier) -> dict[str, int]:
    try:
        return dict(await tier.scan())
    except TierUnavailableError as exc:
        if (clear := _missing_bucket(tier, exc)) is not None:
            raise clear from exc
        raise


async def _listings(
    store_tiers: Mapping[str, Tier], names: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Each named tier's (storage name -> size), listed concurrently."""
    listings = await asyncio.gather(*(_listing(store_tiers[n]) for n in names))
    return dict(zip(names, listings, strict=True))


def _size_and_sha256(view: memoryview) -> tuple[int, str]:
    # Runs on the tier's worker thread, over the tier's own buffer (an LMDB page: no copy).
    return view.nbytes, hashlib.sha256(view).hexdigest()


async def _read_digest(tier: Tier, name: str) -> tuple[int, str] | None:
    try:
        return await tier.read(name, _size_and_sha256)
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
    trust_existing: bool = False,
    prune: bool = False,
) -> PushReport:
    """Make every tier of each level's placement hold a good copy of each of its blocks.

    A copy that is missing is written; one that is there is read back and its sha256 checked
    (`trust_existing=True`: its name and size are taken as proof, for banks too large to read
    back), and rewritten when it is corrupt. `some_levels=True` accepts a placement that leaves
    levels out (their blocks are not copied). `prune=True` deletes this bank's stale copies.

    Each block needing a write is read once from the bank (sha256-checked, on a worker thread)
    and written to the tiers that need it, with at most `concurrency` blocks in flight.
    Interrupted, it leaves only complete copies behind; run it again to finish.
    """
    check_placement(bank.manifest, placement, store_tiers.keys(), every_level=not some_levels)
    started = time.perf_counter()
    names = list(dict.fromkeys(n for level in sorted(placement) for n in placement[level]))
    present = await _listings(store_tiers, names)
    report = PushReport(tiers={n: TierPush(stale=stale_names(bank, present[n])) for n in names})
    blocks = bank.manifest.blocks

    work: dict[BlockKey, list[str]] = {}  # tiers whose copy must be checked or written
    total = 0
    for key, name in _targets(bank, placement):
        size = present[name].get(stored_name(bank, key))
        if trust_existing and size == blocks[str(key)].bytes:
            report.tiers[name].trusted += 1
        else:
            work.setdefault(key, []).append(name)
            total += blocks[str(key)].bytes

    desc = f"push {bank.manifest.bank_id} ({len(work)} blocks)"
    with progress_bar(total, desc, progress) as bar:

        async def copy(item: tuple[BlockKey, list[str]]) -> None:
            key, targets = item
            entry, stored = blocks[str(key)], stored_name(bank, key)
            needed: list[tuple[str, bool]] = []  # (tier, whether a copy was there)
            for name in targets:
                size = present[name].get(stored)
                good = (entry.bytes, entry.sha256)
                if size == entry.bytes and await _read_digest(store_tiers[name], stored) == good:
                    report.tiers[name].checked += 1
                    bar.update(entry.bytes)
                    continue
                needed.append((name, size is not None))
            if not needed:
                return
            data = await asyncio.to_thread(bank.block_bytes, key)
            for name, was_there in needed:
                await store_tiers[name].put(stored, data)
                counts = report.tiers[name]
                if was_there:
                    counts.repaired += 1
                else:
                    counts.written += 1
                counts.bytes_written += len(data)
                bar.update(len(data))

        await _bounded(work.items(), copy, concurrency)
    if prune:
        await _prune(store_tiers, report, concurrency)
    report.seconds = time.perf_counter() - started
    return report


async def _prune(store_tiers: Mapping[str, Tier], report: PushReport, concurrency: int) -> None:
    async def delete(item: tuple[str, str]) -> None:
        name, stale = item
        if await store_tiers[name].delete(stale):
            report.tiers[name].pruned += 1

    items = [(name, stale) for name, t in report.tiers.items() for stale in t.stale]
    await _bounded(items, delete, concurrency)


# -- verify ---------------------------------------------------------------------------------------


@dataclass
class TierVerify:
    """What one tier holds of the bank: good copies, missing and corrupt blocks (with why)."""

    ok: int = 0
    missing: list[str] = field(default_factory=list)  # block keys
    corrupt: dict[str, str] = field(default_factory=dict)  # block key -> what is wrong
    repaired: list[str] = field(default_factory=list)  # of those, rewritten from the bank
    stale: list[str] = field(default_factory=list)  # storage names (see `stale_names`)

    @property
    def good(self) -> bool:
        """Every copy is good now: none was missing or corrupt, or each was repaired."""
        return set(self.missing) | set(self.corrupt) <= set(self.repaired)


@dataclass
class VerifyReport:
    tiers: dict[str, TierVerify] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(t.good for t in self.tiers.values())

    @property
    def repaired(self) -> int:
        return sum(len(t.repaired) for t in self.tiers.values())


async def verify_bank(
    bank: Bank,
    store_tiers: Mapping[str, Tier],
    placement: Mapping[int, Sequence[str]],
    *,
    concurrency: int = 8,
    progress: bool = True,
    repair: bool = False,
) -> VerifyReport:
    """Read every block's copy from every tier of its level and check its size and sha256.

    `repair=True` rewrites each missing or corrupt copy from the bank directory (whose files are
    checked against the manifest first) and lists it as repaired.
    """
    check_placement(bank.manifest, placement, store_tiers.keys())
    started = time.perf_counter()
    targets = _targets(bank, placement)
    names = list(dict.fromkeys(n for _, n in targets))
    listings = await _listings(store_tiers, names)
    report = VerifyReport(
        tiers={n: TierVerify(stale=stale_names(bank, listings[n])) for n in names}
    )
    blocks = bank.manifest.blocks
    total = sum(blocks[str(key)].bytes for key, _ in targets)

    desc = f"verify {bank.manifest.bank_id} ({len(targets)} blocks)"
    with progress_bar(total, desc, progress) as bar:

        async def check(item: tuple[BlockKey, str]) -> None:
            key, name = item
            tier, entry, stored = store_tiers[name], blocks[str(key)], stored_name(bank, key)
            got = await _read_digest(tier, stored)
            counts = report.tiers[name]
            bar.update(entry.bytes)
            if got is None:
                counts.missing.append(str(key))
            elif got[0] != entry.bytes:
                counts.corrupt[str(key)] = f"{got[0]} bytes, the manifest says {entry.bytes}"
            elif got[1] != entry.sha256:
                counts.corrupt[str(key)] = "sha256 does not match the manifest"
            else:
                counts.ok += 1
                return
            if repair:
                await tier.put(stored, await asyncio.to_thread(bank.block_bytes, key))
                counts.repaired.append(str(key))

        await _bounded(targets, check, concurrency)
    for counts in report.tiers.values():  # workers finish out of order
        counts.missing.sort(key=_key_order)
        counts.repaired.sort(key=_key_order)
        counts.corrupt = dict(sorted(counts.corrupt.items(), key=lambda kv: _key_order(kv[0])))
    report.seconds = time.perf_counter() - started
    return report


def _key_order(key: str) -> BlockKey:
    return BlockKey.parse(key)


__all__ = [
    "PushReport",
    "TierPush",
    "TierVerify",
    "VerifyReport",
    "push_bank",
    "stale_names",
    "stored_name",
    "verify_bank",
]
