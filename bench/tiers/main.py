"""Read overhead of `TieredStore` over each tier's raw client read (LMDB, disk, S3).

For each tier and block size, four variants read the same blocks, interleaved round-robin (the
starting variant rotates every round) so that machine noise hits them all alike:

  raw             the plain client call on the event loop thread (LMDB copying get; os.open +
                  os.pread + os.close; boto3 get_object()["Body"].read())
  raw-thread      the same call through loop.run_in_executor (the cost of leaving the loop)
  store           await TieredStore.fetch() with verification off (digests=None): thread hop,
                  breaker, deadlines, single-flight load task, metrics, BytesCodec decode
  store-verified  the same with a manifest digest per key: sha256 of every block, as in production

The RAM cache is disabled (BlockCache(0)), so every fetch reaches the tier; all reads are warm
(page cache, loopback; moto's S3 server runs in a subprocess). Goal of the issue: store <= 1.15x
raw at 1 MiB and above, judged on `store`; `store-verified` is reported beside it. Also measured:
the cost of one copy and one sha256 of a block, and aiofiles (open + read) against os.pread.

    python -m bench.tiers [--sizes 64KiB,1MiB,8MiB] [--reads N] [--tiers lmdb,disk,s3]
                          [--quick] [--out bench/out]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiofiles
import boto3
import uvloop

from bench.common.machine import command_line, machine
from bench.common.servers import MOTO_KEY_ID, MOTO_SECRET, moto_server
from tiers import (
    BlockCache,
    BlockDigest,
    BlockKey,
    BytesCodec,
    DiskTier,
    LmdbTier,
    S3Tier,
    Tier,
    TieredStore,
)
from tiers.keys import storage_key

GOAL = 1.15
KEYS_PER_SIZE = 8
VARIANTS = ("raw", "raw-thread", "store", "store-verified")
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "B": 1}
# Default reads per variant, by tier kind and size (sized for a 1-3 minute run on 2 cores).
DEFAULT_READS = {"local": (20000, 5000, 600), "s3": (1500, 800, 200)}

Read = Callable[[int], Awaitable[int]]


def parse_size(text: str) -> int:
    text = text.strip()
    for unit, mult in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def fmt_size(n: int) -> str:
    for unit in ("MiB", "KiB"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return f"{n}B"


def block_costs(size: int, reps: int) -> dict[str, float]:
    """Median seconds of one copy to fresh bytes (what BytesCodec.decode does) and one sha256."""
    block = os.urandom(size)
    out = {}
    for name, fn in (("copy_s", memoryview.tobytes), ("sha256_s", hashlib.sha256)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(memoryview(block))
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def summarise(samples: list[float]) -> dict[str, float]:
    ordered, n = sorted(samples), len(samples)
    return {"median_s": statistics.median(ordered), "p90_s": ordered[int(0.9 * (n - 1))], "n": n}


def pread_file(path: Path, size: int) -> bytes:
    """What DiskTier does, less its fstat: os.open + os.pread of the whole file + os.close."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def raw_reader(
    kind: str, tier: Tier, endpoint: str | None, sizes: dict[str, int]
) -> Callable[[str], bytes]:
    """The blocking raw client read of one key, for tier `kind`."""
    if kind == "lmdb":
        assert isinstance(tier, LmdbTier)
        env = tier._env

        def lmdb_get(key: str) -> bytes:
            with env.begin() as txn:  # copying get (buffers=False)
                data = txn.get(key.encode())
            assert data is not None
            return data

        return lmdb_get
    if kind == "disk":
        assert isinstance(tier, DiskTier)
        root = tier.root
        return lambda key: pread_file(root / f"{key}.blk", sizes[key])
    assert isinstance(tier, S3Tier)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=MOTO_KEY_ID,
                          aws_secret_access_key=MOTO_SECRET)  # fmt: skip

    def s3_get(key: str) -> bytes:
        body: bytes = client.get_object(Bucket=tier.bucket, Key=key)["Body"].read()
        return body

    return s3_get


def open_tier(kind: str, tmp: Path, endpoint: str | None) -> Tier:
    if kind == "lmdb":
        return LmdbTier(tmp / "lmdb", name="lmdb", map_size=1 << 30)
    if kind == "disk":
        return DiskTier(tmp / "disk", name="disk")
    return S3Tier(
        "hmem-bench", name="s3", endpoint_url=endpoint, region="us-east-1",
        access_key_id=MOTO_KEY_ID, secret_access_key=MOTO_SECRET,
    )  # fmt: skip


async def measure(variants: Mapping[str, Read], reads: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin the variants (rotating who goes first); seconds per read of each."""
    names = list(variants)
    for r in range(warmup):
        for name in names:
            await variants[name](r)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reads):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            await variants[name](r)
            samples[name].append(time.perf_counter() - t0)
    return samples


async def bench_tier(
    kind: str, sizes: list[int], args: argparse.Namespace, endpoint: str | None, tmp: Path
) -> list[dict[str, Any]]:
    tier = open_tier(kind, tmp, endpoint)
    digests: dict[str, BlockDigest] = {}  # filled below; the verifying store holds this dict

    def store(digs: dict[str, BlockDigest] | None) -> TieredStore[bytes]:
        return TieredStore(
            {tier.name: tier}, {1: [tier.name]}, codec=BytesCodec(), ram=BlockCache(0), digests=digs
        )

    plain, verified = store(None), store(digests)  # the RAM cache of 0 bytes caches nothing
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="raw")
    loop = asyncio.get_running_loop()
    rows = []
    try:
        if isinstance(tier, S3Tier):
            await tier.create_bucket()
        keys = {n: [BlockKey("bench", 1, si * 1000 + i) for i in range(KEYS_PER_SIZE)]
                for si, n in enumerate(sizes)}  # fmt: skip
        for size, ks in keys.items():
            for key in ks:
                data = os.urandom(size)
                digests[str(key)] = BlockDigest(size, hashlib.sha256(data).hexdigest())
                # Under the names the stores read: the bare key for the store that verifies
                # nothing, the key and its content for the verifying one (tiers.keys).
                await tier.put(str(key), data)
                await tier.put(storage_key(key, digests[str(key)].sha256), data)
        names = {k: storage_key(k, d.sha256) for k, d in digests.items()}
        raw = raw_reader(kind, tier, endpoint, {names[k]: d.nbytes for k, d in digests.items()})
        for size in sizes:
            ks = keys[size]
            skeys = [names[str(k)] for k in ks]

            async def v_raw(r: int, skeys: list[str] = skeys) -> int:
                return len(raw(skeys[r % KEYS_PER_SIZE]))

            async def v_thread(r: int, skeys: list[str] = skeys) -> int:
                return len(await loop.run_in_executor(pool, raw, skeys[r % KEYS_PER_SIZE]))

            def v_store(s: TieredStore[bytes], ks: list[BlockKey] = ks, size: int = size) -> Read:
                async def read(r: int) -> int:
                    fetched = await s.fetch(ks[r % KEYS_PER_SIZE])
                    assert fetched.ok, fetched.error
                    assert fetched.value is not None
                    assert len(fetched.value) == size
                    return size

                return read

            reads_of = (v_raw, v_thread, v_store(plain), v_store(verified))
            variants = dict(zip(VARIANTS, reads_of, strict=True))
            band = 0 if size < 1 << 20 else 1 if size < 8 << 20 else 2
            reads = args.reads or DEFAULT_READS["s3" if kind == "s3" else "local"][band]
            samples = await measure(variants, reads, warmup=args.warmup)
            stats = {name: summarise(s) for name, s in samples.items()}
            raw_med = stats["raw"]["median_s"]
            ratios = {name: stats[name]["median_s"] / raw_med for name in VARIANTS[1:]}
            goal = None if size < 1 << 20 else ratios["store"] <= GOAL
            rows.append(
                {"tier": kind, "size": size, "size_label": fmt_size(size), "reads": reads}
                | {"stats": stats, "ratios": ratios, "goal_met": goal}
            )
            print(f"  {kind:4} {fmt_size(size):>6}: store/raw {ratios['store']:.2f}x", flush=True)
    finally:
        await plain.aclose()
        await verified.aclose()  # closes the shared tier a second time: a no-op
        pool.shutdown()
    return rows


async def aiofiles_vs_pread(tmp: Path, reads: int) -> dict[str, float]:
    """aiofiles open + read of a 1 MiB file against os.open + os.pread (+ in a worker thread)."""
    path, size = tmp / "aiofiles-1MiB.blk", 1 << 20
    path.write_bytes(os.urandom(size))
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)

    async def v_pread(_: int) -> int:
        return len(pread_file(path, size))

    async def v_thread(_: int) -> int:
        return len(await loop.run_in_executor(pool, pread_file, path, size))

    async def v_aiofiles(_: int) -> int:
        async with aiofiles.open(path, "rb") as f:
            return len(await f.read())

    variants = {"pread": v_pread, "pread-thread": v_thread, "aiofiles": v_aiofiles}
    samples = await measure(variants, reads, warmup=5)  # same round-robin as the tiers
    pool.shutdown()
    med = {f"{name}_median_s": statistics.median(s) for name, s in samples.items()}
    aio = med["aiofiles_median_s"]
    return med | {
        "aiofiles_vs_pread": aio / med["pread_median_s"],
        "aiofiles_vs_pread_thread": aio / med["pread-thread_median_s"],
    }


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us" if seconds < 0.01 else f"{seconds * 1e3:,.2f} ms"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tier | size | raw | raw-thread | store | store-verified | store/raw | verified/raw "
        f"| goal <={GOAL}x |\n" + "|---" * 9 + "|"
    ]
    for row in rows:
        st, ra = row["stats"], row["ratios"]
        cells = [f"{us(st[v]['median_s'])} (p90 {us(st[v]['p90_s'])})" for v in VARIANTS]
        goal = {None: "n/a", True: "met", False: "**missed**"}[row["goal_met"]]
        lines.append(
            f"| {row['tier']} | {row['size_label']} | {' | '.join(cells)} "
            f"| {ra['store']:.2f}x | {ra['store-verified']:.2f}x | {goal} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    kinds = list(dict.fromkeys(row["tier"] for row in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.8), squeeze=False)
    colors = {"raw-thread": "#8da0cb", "store": "#fc8d62", "store-verified": "#66c2a5"}
    for ax, kind in zip(axes[0], kinds, strict=True):
        mine = [row for row in rows if row["tier"] == kind]
        for j, (variant, color) in enumerate(colors.items()):
            ys = [row["ratios"][variant] for row in mine]
            xs = [i + (j - 1) * 0.27 for i in range(len(mine))]
            bars = ax.bar(xs, ys, 0.27, label=variant, color=color)
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(GOAL, color="black", linestyle="--", linewidth=1, label=f"goal {GOAL}x")
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_yscale("log")
        top = max(2.0, 1.5 * max(max(row["ratios"].values()) for row in mine))
        ax.set_ylim(0.8, top)
        ax.set_yticks([t for t in (1, GOAL, 1.5, 2, 3, 5, 10, 20, 50, 100, 200) if t < top])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        labels = [f"{r['size_label']}\nraw {us(r['stats']['raw']['median_s'])}" for r in mine]
        ax.set_xticks(range(len(mine)), labels)
        ax.set_title(f"{kind}: median read time / raw read")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("ratio to the raw read (log scale)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run(args: argparse.Namespace, sizes: list[int], endpoint: str | None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hmem-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for kind in args.tiers:
            rows += await bench_tier(kind, sizes, args, endpoint, tmp / kind)
        files = await aiofiles_vs_pread(tmp, 20 if args.quick else 500)
    return {"rows": rows, "aiofiles": files}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="64KiB,1MiB,8MiB")
    parser.add_argument("--reads", type=int, default=0, help="reads per variant per size")
    parser.add_argument("--tiers", default="lmdb,disk,s3")
    parser.add_argument("--quick", action="store_true", help="a few reads each (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (uvloop: what `hmem serve` runs on)",
    )
    args = parser.parse_args()
    args.tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if unknown := set(args.tiers) - {"lmdb", "disk", "s3"}:
        parser.error(f"unknown tiers: {sorted(unknown)}")
    if args.quick and not args.reads:
        args.reads = 5
    args.warmup = 2 if args.quick else 20

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}")
    print(f"event loop: {args.loop}")
    sizes = list(dict.fromkeys(parse_size(s) for s in args.sizes.split(",")))
    costs = {fmt_size(n): block_costs(n, 5 if args.quick else 50) for n in sizes}
    for label, c in costs.items():
        n = parse_size(label)
        print(
            f"{label:>6} block: sha256 {us(c['sha256_s'])} ({n / c['sha256_s'] / 1e9:.2f} GB/s), "
            f"copy to fresh bytes {us(c['copy_s'])} ({n / c['copy_s'] / 1e9:.2f} GB/s)"
        )

    started = time.perf_counter()
    with moto_server() if "s3" in args.tiers else contextlib.nullcontext("") as endpoint:
        runner = uvloop.run if args.loop == "uvloop" else asyncio.run
        result = runner(run(args, sizes, endpoint or None))
    elapsed = time.perf_counter() - started

    files = result["aiofiles"]
    print(f"\n{table(result['rows'])}\n")
    print(
        f"aiofiles vs os.pread (1 MiB, open + read): {files['aiofiles_vs_pread']:.1f}x "
        f"({us(files['aiofiles_median_s'])} vs {us(files['pread_median_s'])}); "
        f"vs os.pread in a worker thread: {files['aiofiles_vs_pread_thread']:.1f}x "
        f"({us(files['pread-thread_median_s'])})"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    command = command_line()
    report = {"command": command, "machine": info, "loop": args.loop, "block_costs": costs}
    report["goal_ratio"] = GOAL
    report |= {"elapsed_s": elapsed} | result
    (args.out / "tiers.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(result["rows"], args.out / "tiers.png")
    print(f"wrote {args.out / 'tiers.json'} and {args.out / 'tiers.png'} ({elapsed:.0f} s)")
