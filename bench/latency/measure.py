"""Prompt streams and fetch measurements of bench.latency: one case, both banks, cold and warm.

A `Variant` is one bank behind one `TieredStore`; `run_case` builds the variants of a case, feeds
them the same leaves interleaved (cold, then warm on each stream) and summarises their samples
beside the analytic limit (per tier, latency + bytes / bandwidth; the slowest tier).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common.stats import nearest_rank
from bench.latency.setup import CASES, Banks, Env, hier_placement
from server.bank import Bank
from tiers import BlockKey, DeviceProfile, ProfiledTier, TieredStore, build_store

STREAMS = ("uniform", "zipf", "related")
ZIPF_S = 1.1


def make_stream(
    kind: str, n: int, *, leaves: int, branching: int, run: int, rng: random.Random
) -> list[int]:
    """`n` leaf ids: uniform, Zipf(1.1) over a random ranking of leaves, or related runs."""
    if kind == "uniform":
        return [rng.randrange(leaves) for _ in range(n)]
    if kind == "zipf":
        ranking = rng.sample(range(leaves), leaves)
        weights = [1 / (k + 1) ** ZIPF_S for k in range(leaves)]
        return [ranking[r] for r in rng.choices(range(leaves), weights, k=n)]
    out: list[int] = []
    while len(out) < n:  # a run: the children of one parent (levels 1..L-1 shared), shuffled
        parent, children = rng.randrange(leaves // branching), list[int]()
        while len(children) < run:
            children += rng.sample(range(parent * branching, (parent + 1) * branching), branching)
        out += children[:run]
    return out[:n]


@dataclass
class Sample:
    seconds: float
    analytic_s: float
    blocks: list[tuple[int, str, bool, float]]  # (level, tier, cached, seconds) per block


@dataclass
class Variant:
    """One bank behind one store: fetches a leaf's path and computes its analytic time."""

    name: str  # "hier", "flat@disk", "flat@cloud"
    bank: Bank
    store: TieredStore[Any]
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def keys(self, leaf: int) -> list[BlockKey]:
        m = self.bank.manifest
        return [
            BlockKey(m.bank_id, lv, leaf // m.branching ** (m.levels - lv))
            for lv in range(1, m.levels + 1)
        ]

    def analytic(self, loads: list[tuple[str, int]]) -> float:
        """Per tier: latency + its bytes / bandwidth (one link per tier); the slowest tier."""
        per_tier: dict[str, int] = {}
        for tier, nbytes in loads:
            per_tier[tier] = per_tier.get(tier, 0) + nbytes
        return max((self.profiles[t].transfer_s(n) for t, n in per_tier.items()), default=0.0)

    async def fetch(self, leaf: int) -> Sample:
        t0 = time.perf_counter()
        got = await self.store.fetch_many(self.keys(leaf))
        seconds = time.perf_counter() - t0
        if errors := [f"{f.key}: {f.error}" for f in got if f.error is not None]:
            raise RuntimeError(f"{self.name}: fetch failed: {errors}")
        sizes = self.bank.manifest.blocks
        loads = [(str(f.tier), sizes[str(f.key)].bytes) for f in got if not f.cached]
        blocks = [(f.key.level, str(f.tier), f.cached, f.seconds) for f in got]
        return Sample(seconds, self.analytic(loads), blocks)


def stats_ms(seconds: list[float]) -> dict[str, Any]:
    xs = sorted(seconds)
    return {
        "n": len(xs),
        "mean_ms": statistics.fmean(xs) * 1e3,
        "median_ms": statistics.median(xs) * 1e3,
        "p90_ms": nearest_rank(xs, 0.9) * 1e3,
    }


def summarise(samples: list[Sample]) -> dict[str, Any]:
    out = stats_ms([s.seconds for s in samples])
    analytic = statistics.fmean(s.analytic_s for s in samples) * 1e3
    levels = {}
    for level in sorted({b[0] for s in samples for b in s.blocks}):
        blocks = [b for s in samples for b in s.blocks if b[0] == level]
        loads = [b for b in blocks if not b[2]]
        levels[level] = {
            "cached_fraction": 1 - len(loads) / len(blocks),
            "load_mean_ms": statistics.fmean(b[3] for b in loads) * 1e3 if loads else 0.0,
        }
    return out | {
        "analytic_mean_ms": analytic,
        "levels": levels,
        "measured_over_analytic": out["mean_ms"] / analytic if analytic > 0 else None,
        "samples_ms": [round(s.seconds * 1e3, 4) for s in samples],
    }


async def interleave(
    variants: list[Variant],
    leaves: list[int],
    label: str,
    *,
    cold: bool,
    warmup: int = 0,
    limits: dict[str, int] | None = None,
) -> None:
    """Each leaf through every variant (the first one rotating); samples after `warmup` kept."""
    for i, leaf in enumerate(leaves):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:
            if i >= (limits or {}).get(v.name, len(leaves)):
                continue
            if cold:
                v.store.clear_cache()
            sample = await v.fetch(leaf)
            if i >= warmup:
                v.samples.setdefault(label, []).append(sample)


async def calibrate(tier: Any, big: int, reps: int) -> DeviceProfile:
    """A real tier's latency (1-byte reads) and bandwidth (`big`-byte reads), each read with a
    sha256 and a copy, which verification and decoding add per byte."""
    keys = {f"calib/{tier.name}/small": b"x", f"calib/{tier.name}/big": os.urandom(big)}
    for key, data in keys.items():
        await tier.put(key, data)

    def consume(view: memoryview) -> int:
        hashlib.sha256(view).digest()
        return len(bytearray(view))

    times: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(reps):
        for key, ts in times.items():
            t0 = time.perf_counter()
            await tier.read(key, consume)
            ts.append(time.perf_counter() - t0)
    small, large = (statistics.median(ts) for ts in times.values())
    bandwidth = (big - 1) / (large - small) if large > small else float("inf")
    return DeviceProfile(f"{tier.name} (calibrated)", small, bandwidth, "calibrated in this run")


async def run_case(name: str, args: argparse.Namespace, env: Env, banks: Banks) -> dict[str, Any]:
    case, m = CASES[name], banks.hier.manifest
    suffix = "@scaled" if args.scale != 1.0 else ""
    profile = {t: None if p is None else p + suffix for t, p in case.profiles.items()}
    place = hier_placement(m.levels, case.one_disk)
    where = {t: "hier-all" if case.one_disk else f"hier-{t}" for t in set(place.values())}
    pinned = list(range(1, m.levels))
    budget = sum(m.n_nodes(lv) * banks.payload(banks.hier, lv) for lv in pinned)
    budget += args.warm_leaves * banks.payload(banks.hier, m.levels)
    hier_tiers = {t: env.tier(t, w, profile[t]) for t, w in where.items()}
    configs = {"hier": env.config(hier_tiers, place, ram=budget, pin=pinned)}
    for home in ["disk"] if case.one_disk or args.no_flat_cloud else ["disk", "cloud"]:
        flat_tier = {home: env.tier(home, f"flat-{home}", profile[home])}
        configs[f"flat@{home}"] = env.config(flat_tier, {1: home}, ram=budget)
    variants: list[Variant] = []
    try:
        for vname, config in configs.items():
            bank = banks.hier if vname == "hier" else banks.flat
            store = await build_store(config, codec=bank.codec(), digests=bank.manifest.digests())
            variants.append(v := Variant(vname, bank, store))
            for tname, tier in store.tiers.items():
                big = banks.block_bytes(banks.flat, 1)
                v.profiles[tname] = (
                    tier.profile
                    if isinstance(tier, ProfiledTier)
                    else await calibrate(tier, big, args.calib_reps)
                )
        hier, flat, *cloud = variants
        rng = random.Random(f"{args.seed}-{name}")
        shape = {"leaves": banks.flat.manifest.branching, "branching": m.branching, "run": args.run}
        print(f"  {name}: cold ...", flush=True)
        leaves = make_stream("uniform", args.prompts, rng=rng, **shape)
        limits = {v.name: args.cloud_prompts for v in cloud}
        await interleave(variants, leaves, "cold/uniform", cold=True, limits=limits)
        for kind in STREAMS:
            print(f"  {name}: warm {kind} ...", flush=True)
            for v in (hier, flat):
                v.store.clear_cache()
            shallow = [BlockKey(m.bank_id, lv, n) for lv in pinned for n in range(m.n_nodes(lv))]
            await hier.store.fetch_many(shallow)  # resident and pinned, as a server keeps them
            leaves = make_stream(kind, args.warmup + args.prompts, rng=rng, **shape)
            await interleave([hier, flat], leaves, f"warm/{kind}", cold=False, warmup=args.warmup)
    finally:
        for v in variants:
            await v.store.aclose()
    rows = []
    for v in variants[1:]:
        for label, samples in v.samples.items():
            cache, stream = label.split("/")
            h, f = summarise(hier.samples[label]), summarise(samples)
            rows.append(
                {
                    "case": name,
                    "stream": stream,
                    "cache": cache,
                    "flat_home": v.name[5:],
                    "hier": h,
                    "flat": f,
                    "flat_over_hier": f["mean_ms"] / h["mean_ms"],
                    "flat_over_hier_median": f["median_ms"] / h["median_ms"],
                }
            )
    return {
        "case": name,
        "title": case.title,
        "placement": place,
        "ram_budget_bytes": budget,
        "pinned_levels": pinned,
        "rows": rows,
        "profiles": {v.name: {t: asdict(p) for t, p in v.profiles.items()} for v in variants},
        "per_level": {v.name: level_times(v) for v in variants},
    }


def level_times(v: Variant) -> list[dict[str, Any]]:
    """Cold: each level's mean block load time, and its analytic time alone."""
    out = []
    for level in range(1, v.bank.manifest.levels + 1):
        loads = [b for s in v.samples["cold/uniform"] for b in s.blocks if b[0] == level]
        alone = v.profiles[loads[0][1]].transfer_s(Banks.block_bytes(v.bank, level))
        out.append(
            {
                "level": level,
                "tier": loads[0][1],
                "analytic_ms": alone * 1e3,
                "measured_ms": statistics.fmean(b[3] for b in loads) * 1e3,
            }
        )
    return out
