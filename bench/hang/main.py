"""What a hung cloud endpoint costs a burst of block fetches, before and after hedged reads and
deadline-miss breakers.

Level 3 lives on S3 (moto's server in a subprocess on 127.0.0.1), with a replica on disk. Each
burst is N concurrent fetches of distinct level-3 blocks through a fresh `TieredStore` (cold RAM
cache). The S3 process is SIGSTOPped, so its socket still accepts connections but never answers,
as a hung endpoint does, and bursts run back to back under two behaviours:

  old   hedge_after_s=None, count_deadline_misses=False: a read waits for its tier timeout
        (4 x deadline) and only then counts against the breaker
  new   the defaults: a read pending after hedge_after_s (a quarter of the deadline) starts the
        replica's read beside it, and a read still running at its caller's deadline counts
        against the breaker at once

in three scenarios: S3 healthy (for reference), S3 hung with the disk replica, and S3 hung with
no replica (level 3 on S3 alone, where only the breaker can help). The S3 process is always
resumed and killed at the end, whatever happens.

    python -m bench.hang [--n 200] [--bursts 3] [--deadline 0.5] [--block-kib 64]
                         [--quick] [--out bench/out]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.common.machine import command_line, machine
from bench.common.servers import MOTO_KEY_ID, MOTO_SECRET, Moto, moto_process
from bench.common.stats import nearest_rank
from tiers import (
    BlockCache,
    BlockDigest,
    BlockKey,
    BytesCodec,
    DiskTier,
    S3Tier,
    StorePolicy,
    Tier,
    TieredStore,
    storage_key,
)

BANK, LEVEL = "hang", 3
BUCKET = "hmem-hang"
BEHAVIOURS = {
    "old": {"hedge_after_s": None, "count_deadline_misses": False},
    "new": {},
}
SCENARIOS = ("healthy", "hung", "hung, no replica")


def s3_tier(endpoint: str) -> S3Tier:
    # One attempt, short timeouts: a hung request holds a worker thread for read_timeout_s.
    return S3Tier(
        BUCKET, name="cloud", endpoint_url=endpoint, region="us-east-1",
        access_key_id=MOTO_KEY_ID, secret_access_key=MOTO_SECRET,
        connect_timeout_s=1.0, read_timeout_s=5.0, max_attempts=1,
    )  # fmt: skip


def counter(store: TieredStore[bytes], name: str, **labels: str) -> float:
    value = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def loop_lag(tick_s: float = 0.005) -> float:
    """The longest the event loop was late to wake a sleeper, until cancelled: how far a stall
    of the loop (this process's work, or a busy machine) stretched the figures beside it."""
    worst = 0.0
    try:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(tick_s)
            worst = max(worst, time.perf_counter() - t0 - tick_s)
    except asyncio.CancelledError:
        return worst


async def burst(store: TieredStore[bytes], keys: list[BlockKey]) -> dict[str, Any]:
    """N concurrent fetches; wall time, per-fetch latency and outcomes."""

    async def one(key: BlockKey) -> tuple[float, str]:
        t0 = time.perf_counter()
        fetched = await store.fetch(key)
        seconds = time.perf_counter() - t0
        if fetched.ok:
            return seconds, f"ok:{fetched.tier}"
        return seconds, type(fetched.error).__name__

    lag = asyncio.create_task(loop_lag())
    cpu, started = time.process_time(), time.perf_counter()
    try:
        results = await asyncio.gather(*(one(k) for k in keys))
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu  # this process, all threads
    finally:
        lag.cancel()
    max_lag = await lag
    seconds = [s for s, _ in results]
    outcomes: dict[str, int] = {}
    for _, outcome in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {
        "n": len(keys),
        "wall_ms": wall * 1e3,
        "p50_ms": statistics.median(seconds) * 1e3,
        "p99_ms": nearest_rank(seconds, 0.99) * 1e3,
        "ok": sum(v for k, v in outcomes.items() if k.startswith("ok:")),
        "loop_lag_ms": max_lag * 1e3,
        "cpu_ms": cpu * 1e3,
        "outcomes": dict(sorted(outcomes.items())),
    }


async def scenario(
    args: argparse.Namespace,
    moto: Moto,
    behaviour: str,
    name: str,
    key_sets: list[list[BlockKey]],
    digests: dict[str, BlockDigest],
    disk_root: Path,
) -> list[dict[str, Any]]:
    tiers: dict[str, Tier] = {"cloud": s3_tier(moto.endpoint_url), "disk": DiskTier(disk_root)}
    placement = {LEVEL: ["cloud"] if name.endswith("no replica") else ["cloud", "disk"]}
    policy = StorePolicy(deadline_s=args.deadline, **BEHAVIOURS[behaviour])  # type: ignore[arg-type]
    store = TieredStore(
        tiers, placement, codec=BytesCodec(), ram=BlockCache(1 << 30), digests=digests,
        policy=policy,
    )  # fmt: skip
    rows = []
    hung = name.startswith("hung")
    try:
        # Warm connections first, as a serving process has them: a hung endpoint then holds
        # requests sent on open keep-alive connections, not only new ones.
        await asyncio.gather(*(tiers["cloud"].contains(f"warm/{i}") for i in range(16)))
        stopped_at = time.monotonic()
        if hung:
            moto.pause()
        for b, keys in enumerate(key_sets[: 1 if not hung else None]):
            before = {r: counter(store, "hmem_store_hedges_total", level="3", result=r)
                      for r in ("won", "lost")}  # fmt: skip
            row = await burst(store, keys)
            opened = store.breaker("cloud").opened_at
            row |= {
                "scenario": name,
                "behaviour": behaviour,
                "burst": b + 1,
                "hedges_won": counter(store, "hmem_store_hedges_total", level="3", result="won")
                - before["won"],
                "hedges_lost": counter(store, "hmem_store_hedges_total", level="3", result="lost")
                - before["lost"],
                "breakers": {t: s.name.lower() for t, s in store.breaker_states().items()},
                "cloud_opened_after_s": None if opened is None or not hung else opened - stopped_at,
            }
            rows.append(row)
    finally:
        moto.resume()  # the hung requests now complete, so the tier can close
        await store.aclose()
    return rows


async def run(args: argparse.Namespace, moto: Moto, tmp: Path) -> list[dict[str, Any]]:
    keys = [
        [BlockKey(BANK, LEVEL, b * args.n + i) for i in range(args.n)] for b in range(args.bursts)
    ]
    digests: dict[str, BlockDigest] = {}
    seeder = s3_tier(moto.endpoint_url)
    disk = DiskTier(tmp / "disk", fsync=False)
    try:
        await seeder.create_bucket()
        sem = asyncio.Semaphore(16)

        async def put(key: BlockKey) -> None:
            data = os.urandom(args.block_kib << 10)
            digest = BlockDigest(len(data), hashlib.sha256(data).hexdigest())
            digests[str(key)] = digest
            name = storage_key(key, digest.sha256)
            async with sem:
                await asyncio.gather(seeder.put(name, data), disk.put(name, data))

        await asyncio.gather(*(put(k) for ks in keys for k in ks))
    finally:
        await seeder.aclose()
        await disk.aclose()
    rows: list[dict[str, Any]] = []
    for name in SCENARIOS:
        for behaviour in BEHAVIOURS:
            rows += await scenario(args, moto, behaviour, name, keys, digests, tmp / "disk")
            r = rows[-1]
            print(f"  {name:17} {behaviour}: last burst {r['wall_ms']:.0f} ms", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | behaviour | burst | ok | outcomes | wall ms | p50 ms | p99 ms "
        "| hedges won/lost | breakers | loop lag ms | cpu ms |\n" + "|---" * 12 + "|"
    )
    lines = [head]
    for r in rows:
        outcomes = ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())
        breaker = r["breakers"]["cloud"]
        if r["cloud_opened_after_s"] is not None:
            breaker += f" ({r['cloud_opened_after_s'] * 1e3:.0f} ms after the hang)"
        if r["breakers"]["disk"] != "closed":
            breaker += f"; disk {r['breakers']['disk']}"
        lines.append(
            f"| {r['scenario']} | {r['behaviour']} | {r['burst']} | {r['ok']}/{r['n']} "
            f"| {outcomes} | {r['wall_ms']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['hedges_won']:.0f}/{r['hedges_lost']:.0f} | {breaker} "
            f"| {r['loop_lag_ms']:.0f} | {r['cpu_ms']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hang", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--n", type=int, default=200, help="concurrent fetches per burst")
    parser.add_argument("--bursts", type=int, default=3, help="bursts back to back while hung")
    parser.add_argument("--deadline", type=float, default=0.5, help="the store's deadline_s")
    parser.add_argument("--block-kib", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop after this long")
    parser.add_argument("--quick", action="store_true", help="N=20, 2 bursts, 0.2 s deadline")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    if args.quick:
        args.n, args.bursts, args.deadline, args.block_kib = 20, 2, 0.2, 16
    # A SIGTERM unwinds like Ctrl-C, so the S3 process is resumed and killed on the way out.
    logging.getLogger("tiers").setLevel(logging.ERROR)  # the table says what the warnings would
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}")
    hedge_s = StorePolicy(deadline_s=args.deadline).hedge_delay_s
    assert hedge_s is not None
    print(
        f"burst: {args.n} fetches of distinct {args.block_kib} KiB level-3 blocks; "
        f"deadline {args.deadline * 1e3:.0f} ms, tier timeout {4 * args.deadline * 1e3:.0f} ms, "
        f"new: hedge after {hedge_s * 1e3:.0f} ms"
    )
    started = time.perf_counter()

    async def bounded(moto: Moto, tmp: Path) -> list[dict[str, Any]]:
        async with asyncio.timeout(args.budget_s):
            return await run(args, moto, tmp)

    with tempfile.TemporaryDirectory(prefix="hmem-hang-") as tmpdir, moto_process() as moto:
        moto_pid = moto.pid
        rows = uvloop.run(bounded(moto, Path(tmpdir)))
    elapsed = time.perf_counter() - started

    print(f"\n{table(rows)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command_line(),
        "machine": info,
        "n": args.n,
        "bursts": args.bursts,
        "deadline_s": args.deadline,
        "block_bytes": args.block_kib << 10,
        "behaviours": BEHAVIOURS,
        "rows": rows,
        "moto_pid": moto_pid,  # resumed and killed by now
        "elapsed_s": elapsed,
    }
    (args.out / "hang.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'hang.json'} ({elapsed:.0f} s)")
