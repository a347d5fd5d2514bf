"""`hmem bank generate`: a bank of a given shape, random weights, each level written into its tier.

A paper-scale bank (37 GB at `paper-160m`) is larger than RAM and than the disk can hold twice,
so blocks are never written to the bank directory: each is made in memory, hashed and put
straight into the tiers of its level's placement (LMDB, a directory, S3) under its content name,
as `hmem bank push` would have put it. The bank directory gets everything else: the anchor
(Hugging Face layout) and its tokenizer, the router, the generic memories, `serve.json` (the
settings that serve this bank from those tiers) and, last, `manifest.json`, which lists every
block's size and sha256. A directory without a manifest is an unfinished generation.

Resumable: `generate.json` records the shape, block dtype, seed and placement, and
`generate-journal.jsonl` gets one line per block once every tier of its level holds it (tier
writes are atomic). Run the same command again after an interruption and it skips the journal's
blocks; one given with a different shape, dtype, seed or placement is refused. Block bytes depend
only on (seed, level, node, dtype) (`server.bank.synthetic`), so a block written but not yet
journalled is rewritten identically.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.bank.codec import encode_block
from server.bank.errors import BankExistsError
from server.bank.manifest import FORMAT, MANIFEST_NAME, VERSION, BlockEntry, parse_manifest
from server.bank.paths import ANCHOR_DIR, generic_relpath
from server.bank.placement import check_placement, tier_location
from server.bank.push import progress_bar
from server.bank.random_bank import random_centroids
from server.bank.router_file import ROUTER_NAME, encode_router
from server.bank.shapes import BankShape
from server.bank.synthetic import (
    random_block_bytes,
    random_generic_block,
    write_random_anchor,
    write_tokenizer,
)
from server.model.memory import MemoryType
from server.routing import HashedTfidfEmbedder
from tiers.base import Tier
from tiers.config import StoreConfig, open_tier
from tiers.disk import fsync_dir
from tiers.errors import ConfigError
from tiers.keys import BlockKey, storage_key
from tiers.s3 import S3Tier

PLAN = "generate.json"
JOURNAL = "generate-journal.jsonl"
SERVE_SETTINGS = "serve.json"
_JOURNAL_SYNC_S = 2.0


@dataclass
class GenerateReport:
    """What one `generate_bank` call did."""

    written: dict[int, int] = field(default_factory=dict)  # level -> blocks written now
    resumed: int = 0  # blocks the journal already listed
    bytes_written: int = 0
    seconds: float = 0.0
    complete: bool = False  # the bank was already whole: nothing to do


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _plan(shape: BankShape, config: StoreConfig, bank_id: str, seed: int) -> dict[str, Any]:
    return {
        "shape": shape.name,
        "dtype": shape.dtype,
        "bank_id": bank_id,
        "seed": seed,
        "placement": {
            str(level): [tier_location(config.tiers[n]) for n in names]
            for level, names in sorted(config.placement.items())
        },
    }


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        old.setdefault("dtype", "bfloat16")  # a plan from before --dtype: every shape was bf16
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            raise ConfigError(
                f"{out} holds an unfinished generation with a different "
                + ", ".join(f"{k} ({old.get(k)!r}, now {plan[k]!r})" for k in diff)
                + f"; run it with the same arguments to resume, or delete {out} to start over"
            )
        return
    if out.exists() and any(p.name != PLAN for p in out.iterdir()):
        raise BankExistsError(out, "exists and is not an unfinished generation; not writing here")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, (json.dumps(plan, indent=2) + "\n").encode())


def _read_journal(path: Path) -> dict[str, BlockEntry]:
    done: dict[str, BlockEntry] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:  # a torn last line (a crash mid-write) is skipped: that block is redone
            item = json.loads(line)
            done[item["key"]] = BlockEntry(bytes=item["bytes"], sha256=item["sha256"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return done


def _manifest_fields(shape: BankShape, bank_id: str) -> dict[str, Any]:
    embedder = HashedTfidfEmbedder(dim=shape.router_dim, ngram_max=2, seed=0)
    return {
        "format": FORMAT,
        "version": VERSION,
        "bank_id": bank_id,
        "memory_type": MemoryType.FFN,
        "levels": shape.levels,
        "branching": shape.branching,
        "widths": list(shape.widths),
        "dtype": shape.dtype,
        "model": shape.model_shape(),
        "embedder": embedder.spec,
    }


def _write_small_files(
    out: Path, shape: BankShape, bank_id: str, seed: int
) -> dict[str, BlockEntry]:
    """The anchor and tokenizer (unless already whole), router and generic memories."""
    anchor = out / ANCHOR_DIR
    if not (anchor / "config.json").is_file():
        write_random_anchor(shape, anchor, seed=seed)  # config.json last: it marks it whole
    if not (anchor / "tokenizer_config.json").is_file():
        write_tokenizer(shape, anchor)
    manifest = parse_manifest(_manifest_fields(shape, bank_id), source="(generate)")
    gen = torch.Generator().manual_seed(seed)
    router = {
        f"centroids.L{level}": random_centroids(
            manifest.n_nodes(level), shape.router_dim, generator=gen
        )
        for level in range(1, shape.levels + 1)
    }
    state = HashedTfidfEmbedder(dim=shape.router_dim, ngram_max=2, seed=0).state_tensors()
    router.update({f"embedder.{name}": t for name, t in state.items()})
    _write_atomic(out / ROUTER_NAME, encode_router(manifest, router))
    generic: dict[str, BlockEntry] = {}
    for level in range(1, shape.levels + 1):
        data = encode_block(random_generic_block(shape, level, seed=seed), dtype=shape.dtype)
        path = out / generic_relpath(level)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
        generic[f"L{level}"] = BlockEntry(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return generic


def _serve_settings(out: Path, config: StoreConfig) -> dict[str, Any]:
    """Settings that serve this bank from its tiers (credentials: AWS_* environment)."""
    store = config.model_dump(mode="json", exclude_none=True)
    for tier in store["tiers"].values():
        tier.pop("access_key_id", None)
        tier.pop("secret_access_key", None)
    return {"bank": str(out.resolve()), "dtype": "bfloat16", "store": store}


async def _put_everywhere(tiers: list[Tier], name: str, data: bytes) -> None:
    await asyncio.gather(*(tier.put(name, data) for tier in tiers))


async def generate_bank(
    out: str | Path,
    shape: BankShape,
    config: StoreConfig,
    *,
    bank_id: str | None = None,
    seed: int = 0,
    concurrency: int = 8,
    create_bucket: bool = True,
    progress: bool = True,
) -> GenerateReport:
    """Generate (or resume generating) a bank of `shape` whose blocks live in `config`'s tiers."""
    out = Path(out)
    bank_id = bank_id or shape.name
    report = GenerateReport()
    if (out / MANIFEST_NAME).is_file():
        if (out / PLAN).is_file():  # a finished bank of other arguments is not "complete"
            _check_plan(out, _plan(shape, config, bank_id, seed))
        report.complete = True
        return report
    fields = _manifest_fields(shape, bank_id)
    empty = parse_manifest(fields, source="(generate)")
    check_placement(empty, config.placement, config.tiers.keys(), every_level=False)
    missing = [lvl for lvl in range(1, shape.levels + 1) if lvl not in config.placement]
    if missing:
        raise ConfigError(f"levels {missing} have no tier: add --tier LEVEL=URI for each")
    _check_plan(out, _plan(shape, config, bank_id, seed))
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(2, thread_name_prefix="generate") as pool:
        generic = await loop.run_in_executor(pool, _write_small_files, out, shape, bank_id, seed)
        journal_path = out / JOURNAL
        done = _read_journal(journal_path)
        report.resumed = len(done)
        todo = [
            BlockKey(bank_id, level, node)
            for level in range(1, shape.levels + 1)
            for node in range(shape.n_nodes(level))
            if str(BlockKey(bank_id, level, node)) not in done
        ]
        names = dict.fromkeys(n for lvl in sorted(config.placement) for n in config.placement[lvl])
        tiers = {name: open_tier(name, config.tiers[name]) for name in names}
        try:
            if create_bucket:
                for tier in tiers.values():
                    if isinstance(tier, S3Tier):
                        await tier.create_bucket()
            bar = progress_bar(sum(shape.block_bytes(k.level) for k in todo), "generate", progress)
            with open(journal_path, "a") as journal, bar:  # noqa: ASYNC230 (appends of a line)
                await _write_blocks(
                    todo, shape, seed, config, tiers, pool, journal, done, report, bar, concurrency
                )
        finally:
            for tier in tiers.values():
                await tier.aclose()
    manifest = parse_manifest({**fields, "generic": generic, "blocks": done}, source="(generated)")
    _write_atomic(
        out / SERVE_SETTINGS, (json.dumps(_serve_settings(out, config), indent=2) + "\n").encode()
    )
    _write_atomic(out / MANIFEST_NAME, manifest.to_json().encode())  # last: the bank is whole
    fsync_dir(out)
    journal_path.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


async def _write_blocks(
    todo: list[BlockKey],
    shape: BankShape,
    seed: int,
    config: StoreConfig,
    tiers: Mapping[str, Tier],
    pool: ThreadPoolExecutor,
    journal: Any,
    done: dict[str, BlockEntry],
    report: GenerateReport,
    bar: Any,
    concurrency: int,
) -> None:
    """Make each block on `pool`, put it in its level's tiers, journal it; `concurrency` at once."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    last_sync = time.monotonic()

    async def one(key: BlockKey) -> None:
        nonlocal last_sync
        try:
            data, sha = await loop.run_in_executor(
                pool, random_block_bytes, shape, key.level, key.node, seed
            )
            targets = [tiers[n] for n in config.placement[key.level]]
            await _put_everywhere(targets, storage_key(key, sha), data)
            done[str(key)] = BlockEntry(bytes=len(data), sha256=sha)
            journal.write(json.dumps({"key": str(key), "bytes": len(data), "sha256": sha}) + "\n")
            journal.flush()
            if time.monotonic() - last_sync > _JOURNAL_SYNC_S:
                os.fsync(journal.fileno())
                last_sync = time.monotonic()
            report.written[key.level] = report.written.get(key.level, 0) + 1
            report.bytes_written += len(data)
            bar.update(shape.block_bytes(key.level))
        finally:
            slots.release()

    tasks: set[asyncio.Task[None]] = set()
    try:
        for key in todo:
            await slots.acquire()
            for t in [t for t in tasks if t.done()]:
                tasks.discard(t)
                t.result()  # the first failure stops the generation
            tasks.add(asyncio.create_task(one(key)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        os.fsync(journal.fileno())
