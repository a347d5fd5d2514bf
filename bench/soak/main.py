"""Soak: the real server under load and faults, for a bounded time; what broke and how it came back.

A 3-level bank on the demo bank's trained anchor (4 / 16 / 64 clusters, as the API tests'
`write_three_level_bank`) is pushed to real tiers (`push_bank`): level 1 on LMDB, level 2 on
disk, level 3 on S3, the S3 server being moto's (`python -m moto.server`) in its own process.
`hmem serve` runs in another process, configured by a settings file (the tiers as the tests'
`three_tier_store`, `deadline_s` 0.5 s, an admin key, a RAM cache of 0 bytes by default so that
every request reads its blocks from the tiers and meets every fault; `--ram-cache` changes it).

For `--duration` seconds (`--quick`: about 25 s and one fault of each kind), `--clients`
clients send completions and chat completions (streaming and not, greedy, fixed prompts),
streams closed after a few chunks, and malformed requests (`bench.soak.load`), while faults cycle
(`bench.soak.faults`): S3 killed and restarted (level 3 pushed again: moto keeps objects in memory
only), S3 stopped and resumed, a disk copy and an LMDB copy corrupted on the prompts' paths.

Reported side by side (`bench.soak.report`; a markdown table and bench/out/soak.json): requests by
kind and status; every clean answer (all blocks from tiers, nothing degraded) against its
prompt's baseline, recorded before any fault (a corrupt block applied would change the greedy
text); corrupt copies injected and still corrupt at the end (`verify_bank` reads every copy
back); recovery after each fault; `memory.degraded` reasons per fault window; the server's RSS
after warm-up and at the end. The server's log is copied to bench/out/soak-server.log. Children
are killed on every exit path (SIGCONT first).

    python -m bench.soak [--duration 300] [--clients 8] [--quick] [--ram-cache 0]
                         [--seed 0] [--out bench/out]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from bench.common.machine import command_line, machine
from bench.common.servers import MOTO_KEY_ID, MOTO_SECRET, HmemServer, Moto, free_port
from bench.latency.setup import DEMO_SHAPE
from bench.soak.faults import FAULTS, HOME, Fault, Injector
from bench.soak.load import PROMPTS, Load, record_baseline
from bench.soak.report import (
    by_window,
    degraded_events,
    fault_table,
    goal_table,
    goals,
    request_table,
    requests,
    summary_line,
)
from server.bank import Bank, write_random_bank
from server.bank.push import push_bank, verify_bank
from server.defaults import DEMO_BANK
from tiers import open_tier
from tiers.base import Tier
from tiers.config import StoreConfig
from tiers.s3 import S3Tier

BUCKET = "hmem-soak"
ADMIN_KEY = "soak-admin-key"
PLACEMENT = {level: [tier] for level, tier in HOME.items()}


@dataclass(frozen=True)
class Timing:
    duration_s: float
    warm_s: float  # load before the first fault; the start RSS is read after it
    hold_s: float  # S3 down or stopped
    recovery_s: float  # the longest wait for a recovery
    calm_s: float  # between one fault's recovery and the next fault


def timing(args: argparse.Namespace) -> Timing:
    if args.quick:
        return Timing(args.duration or 25.0, warm_s=2.0, hold_s=1.5, recovery_s=4.0, calm_s=1.0)
    return Timing(args.duration or 300.0, warm_s=5.0, hold_s=3.0, recovery_s=20.0, calm_s=4.0)


# -- the bank, its tiers and the server's settings ----------------------------------------------


def write_bank(out: Path) -> Bank:
    """A 3-level random bank (4 / 16 / 64 clusters) on the demo bank's trained anchor."""
    write_random_bank(
        out,
        bank_id="soak",
        levels=3,
        branching=4,
        widths=(16, 8, 8),
        model=DEMO_SHAPE,
        anchor_dir=DEMO_BANK / "anchor",
        embedder={"kind": "hashed-tfidf", "dim": 256, "ngram_max": 2, "seed": 0},
    )
    return Bank.open(out)


def store_settings(work: Path, endpoint: str, *, ram_cache: int, patient: bool) -> dict[str, Any]:
    """The tiers as `three_tier_store` has them; `patient`: S3 timeouts for the bench's pushes."""
    cloud: dict[str, Any] = {
        "kind": "s3",
        "bucket": BUCKET,
        "prefix": "banks",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id": MOTO_KEY_ID,
        "secret_access_key": MOTO_SECRET,
    }
    cloud |= (
        {"connect_timeout_s": 2.0, "read_timeout_s": 10.0, "max_attempts": 3}
        if patient
        else {"connect_timeout_s": 0.5, "read_timeout_s": 1.0, "max_attempts": 1}
    )
    return {
        "tiers": {
            "flash": {"kind": "lmdb", "path": str(work / "flash.lmdb")},
            "disk": {"kind": "disk", "root": str(work / "disk"), "fsync": False},
            "cloud": cloud,
        },
        "placement": PLACEMENT,
        "ram_cache": ram_cache,
        "deadline_s": 0.5,
        "breaker_reset_s": 2.0,
    }


def open_tiers(store: dict[str, Any]) -> dict[str, Tier]:
    config = StoreConfig.model_validate(store)
    return {name: open_tier(name, t) for name, t in config.tiers.items()}


# -- the run ------------------------------------------------------------------------------------


async def _routes(client: httpx.AsyncClient) -> dict[int, list[int]]:
    routes = {}
    for i, prompt in enumerate(PROMPTS):
        r = await client.post("/v1/memory/route", json={"text": prompt})
        routes[i] = r.raise_for_status().json()["node_ids"]
    return routes


async def _engine_idle(client: httpx.AsyncClient, timeout_s: float = 10.0) -> int | None:
    """Sequences still active once the load has stopped (0 when disconnects freed their rows)."""
    active = None
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.2) + 1):
        with contextlib.suppress(httpx.HTTPError, KeyError):
            active = (await client.get("/ready")).json()["engine"]["active"]
            if active == 0:
                return 0
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    return active


async def _metrics(client: httpx.AsyncClient) -> list[str]:
    """The store's read, promotion and degradation counters, as the server exposes them."""
    with contextlib.suppress(httpx.HTTPError):
        text = (await client.get("/metrics")).text
        keep = ("hmem_tier_reads_total{", "hmem_tier_promotions_total{", "hmem_memory_degraded")
        return [line for line in text.splitlines() if line.startswith(keep)]
    return []


async def _faults(injector: Injector, t: Timing, quick: bool) -> list[Fault]:
    """The schedule: each kind in turn, while another fault and its recovery fit in the run."""
    done: list[Fault] = []
    for i in range(10_000):
        kind = FAULTS[i % len(FAULTS)]
        if quick and i == len(FAULTS):
            break
        budget = t.hold_s + t.recovery_s + t.calm_s
        if not quick and injector.clock() + budget > t.duration_s:
            break
        print(f"  {injector.clock():6.1f} s  fault {i}: {kind}", flush=True)
        done.append(await injector.run(kind))
        await asyncio.sleep(t.calm_s)
    return done


async def soak(args: argparse.Namespace, work: Path, t: Timing) -> dict[str, Any]:
    moto = Moto(free_port(), work / "moto.log")
    server: HmemServer | None = None
    tiers: dict[str, Tier] = {}
    try:
        moto.start()
        await asyncio.to_thread(moto.wait_ready)
        bank = await asyncio.to_thread(write_bank, work / "bank")
        tiers = open_tiers(store_settings(work, moto.endpoint_url, ram_cache=0, patient=True))
        cloud = tiers["cloud"]
        assert isinstance(cloud, S3Tier)
        await cloud.create_bucket()
        await push_bank(bank, tiers, PLACEMENT, progress=False)

        port = free_port()
        store = store_settings(work, moto.endpoint_url, ram_cache=args.ram_cache, patient=False)
        settings = {"bank": str(bank.path), "data_dir": str(work / "state"), "port": port}
        settings |= {"store": store, "admin_key": ADMIN_KEY, "host": "127.0.0.1", "warmup": True}
        (work / "settings.json").write_text(json.dumps(settings, indent=2))
        server = HmemServer(work / "settings.json", port, work / "server.log")
        server.start()
        ready_s = await asyncio.to_thread(server.wait_ready)
        print(f"server ready in {ready_s:.1f} s (pid {server.pid}, {server.url})", flush=True)
        return await drive(args, t, bank=bank, tiers=tiers, moto=moto, server=server) | {
            "server_ready_s": round(ready_s, 2),
            "settings": {k: v for k, v in settings.items() if k not in ("store", "admin_key")}
            | {"store": {k: v for k, v in store.items() if k != "tiers"}},
        }
    finally:
        if server is not None:
            server.stop()
        moto.stop()
        await asyncio.gather(*(tier.aclose() for tier in tiers.values()), return_exceptions=True)
        with contextlib.suppress(OSError):  # the server's warnings, for a look after the run
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "server.log", args.out / "soak-server.log")


async def drive(
    args: argparse.Namespace,
    t: Timing,
    *,
    bank: Bank,
    tiers: dict[str, Tier],
    moto: Moto,
    server: HmemServer,
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients)
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30.0, limits=limits) as client,
        httpx.AsyncClient(base_url=server.url, timeout=10.0, headers=headers) as probe,
    ):
        baseline, problems = await record_baseline(probe)
        for p in problems:
            print(f"  baseline: {p}", flush=True)
        routes = await _routes(probe)
        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0

        load = Load(client, clock, baseline, seed=args.seed)
        injector = Injector(
            probe, clock, moto, bank, tiers, routes, hold_s=t.hold_s, recovery_s=t.recovery_s
        )
        stop = asyncio.Event()
        workers = asyncio.create_task(load.run(args.clients, stop))
        rss: list[tuple[float, int | None]] = []
        try:
            await asyncio.sleep(t.warm_s)
            rss.append((round(clock(), 1), server.rss_kib()))
            print(f"load: {args.clients} clients; faults from {clock():.1f} s", flush=True)
            faults = await _faults(injector, t, args.quick)
            for _ in range(int(t.duration_s / 5.0) + 1):  # the rest of the run: load only
                if clock() >= t.duration_s:
                    break
                await asyncio.sleep(min(5.0, t.duration_s - clock()))
                rss.append((round(clock(), 1), server.rss_kib()))
        finally:
            stop.set()
            try:
                await asyncio.wait_for(workers, timeout=60)
            except TimeoutError:
                print("  the clients did not stop within 60 s; cancelled", flush=True)
        active = await _engine_idle(probe)
        rss.append((round(clock(), 1), server.rss_kib()))
        metrics = await _metrics(probe)
        alive = server.alive
    verify = await verify_bank(bank, tiers, PLACEMENT, progress=False)
    return {
        "run_s": round(clock(), 1),
        "baseline": {f"{f}:{PROMPTS[i]}": text for (f, i), text in baseline.items()},
        "baseline_problems": problems,
        "routes": {PROMPTS[i]: nodes for i, nodes in routes.items()},
        "outcomes": load.outcomes,
        "mismatches": load.mismatches,
        "faults": faults,
        "rss_kib": rss,
        "engine_active_at_end": active,
        "server_alive_at_end": alive,
        "metrics": metrics,
        "verify": {
            name: {"ok": v.ok, "missing": v.missing, "corrupt": v.corrupt}
            for name, v in verify.tiers.items()
        },
        "verify_ok": verify.ok,
    }


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Tables printed; the JSON-able report."""
    outcomes, faults = result.pop("outcomes"), result["faults"]
    req = requests(outcomes)
    windows = by_window(outcomes, faults)
    still = sum(len(v["corrupt"]) for v in result["verify"].values())
    rss = result["rss_kib"]
    rows = goals(
        req,
        faults,
        still_corrupt=still,
        verify_ok=result["verify_ok"],
        rss_kib=(rss[0][1], rss[-1][1]),
        active_at_end=result["engine_active_at_end"],
    )
    print(f"\n{request_table(req)}\n\n{fault_table(faults, windows)}\n\n{goal_table(rows)}\n")
    print(summary_line(rows))
    events = degraded_events(outcomes, faults)
    calm = [e for e in events if e["window"] == "calm"]
    if calm:
        when = ", ".join(f"{e['t']:.1f}" for e in calm[:20])
        print(f"degraded answers outside any fault window: {len(calm)}, at t = {when} s")
    missing = {n: v["missing"] for n, v in result["verify"].items() if v["missing"]}
    if missing:
        print(f"copies missing at the end: {missing}")
    if not result["server_alive_at_end"]:
        print("**the server process was not alive at the end**")
    return result | {
        "requests": req,
        "windows": windows,
        "degraded_events": events,
        "goals": rows,
        "faults": [f.as_dict() for f in faults],
        "still_corrupt": still,
    }


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`: the children are stopped


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, help="seconds of load (default 300; quick 25)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--quick", action="store_true", help="short, one fault of each kind")
    parser.add_argument("--ram-cache", type=int, default=0, help="server RAM cache bytes")
    parser.add_argument("--seed", type=int, default=0, help="the clients' random choices")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="soak.json goes here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    t = timing(args)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}")
    print(f"soak: {t.duration_s:.0f} s, {args.clients} clients, faults {', '.join(FAULTS)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hmem-soak-") as tmp:
        result = asyncio.run(soak(args, Path(tmp), t))
    elapsed = time.perf_counter() - started
    out = report(result) | {
        "command": command_line(),
        "machine": info,
        "timing": t.__dict__,
        "clients": args.clients,
        "elapsed_s": round(elapsed, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'soak.json'} ({elapsed:.0f} s)")
