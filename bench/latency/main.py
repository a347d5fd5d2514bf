"""Fetch latency of a prompt's memory: a hierarchical bank against a flat one (docs/paper.md §5).

The seed's headline systems claim (paper, Fig. 5): with level 1 on flash, level 2 on an external
disk and level 3 in the cloud, loading a prompt's memory takes 38 ms, against 198 ms for a flat
bank of the same fetch size on the external disk. This script measures that through the real
`TieredStore` (sha256 verification and the bank codec's decode included) on two real banks
written with `write_random_bank`:

  hier   `--levels` levels (3), branching `--branching` (4: 4/16/64 blocks), block bytes 4x per
         level up (the seed's 16:4:1), `--fetch-mib` bytes per path. Level 1 on flash (LMDB), the
         deepest level in the cloud (S3: moto's server in a subprocess, over loopback), the levels
         between on the external disk (one file per block).
  flat   one level of branching**levels blocks, each of the whole fetch size: the same bytes per
         prompt. On the external disk, as in the paper; also on the cloud (extra rows, cold).

Cases (`--cases`): `seed` emulates the seed's devices (`seed-flash`, `seed-external-disk`,
`seed-cloud` in tiers/profiles.toml) with `ProfiledTier`; `seed-cloud-20ms` the same with a
typical S3 first byte in the cloud; `seed-one-disk` both banks wholly on the external disk (the
paper's Fig. 5, right); `real` this machine's tiers, no profile (page cache warm, S3 over
loopback); `user` the profiles of `--profile-set` (from `--profiles FILE` or built in). Emulated
cases keep time at reduced scale: bandwidths are divided by `--scale` (default: the paper's
3.194 GB fetch over ours), so our fetch takes what the paper's takes on the device.

Prompts are leaves of the tree. Cold: the RAM cache is emptied before every prompt, so the stream
does not matter (measured on the uniform one). Warm: a RAM budget of levels 1..L-1 of the hierarchy
(loaded first and pinned, as a server keeps its shallow levels) and `--warm-leaves` deepest blocks,
the same bytes for the flat bank, after a warm-up pass, on three streams: uniform leaves, Zipf(1.1)
leaf popularity, and runs of related prompts that share levels 1..L-1 (only the deepest block
changes). Variants are interleaved prompt by prompt, the first rotating. Analytic limit of a prompt:
per tier, latency + bytes / bandwidth of the blocks it loads (blocks on one tier share its link),
the path bound by its slowest tier; blocks served from RAM cost nothing. For `real`, each tier's
latency and bandwidth are calibrated in the run (1-byte and large reads, with a sha256 and a copy).
Ratios are of means (expected fetch time per prompt); medians and p90 are printed beside.

End to end: `--e2e` serves the two banks (on the demo anchor, seed profiles, no RAM cache: every
request loads every level) from two servers in this process and times the first token over HTTP;
`--e2e-url-hier URL --e2e-url-flat URL` does the same against running servers.

    python -m bench.latency [--fetch-mib 4] [--levels 3] [--branching 4] [--dtype float32]
                            [--cases seed,seed-cloud-20ms,seed-one-disk,real] [--scale S]
                            [--profiles FILE] [--profile-set flash=NAME,disk=NAME,cloud=NAME]
                            [--prompts 48] [--warmup 32] [--e2e] [--quick] [--out bench/out/latency]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.common.machine import command_line, machine
from bench.common.servers import moto_server
from bench.latency.e2e import e2e_local, e2e_measure
from bench.latency.measure import run_case
from bench.latency.report import e2e_table, goals, plot, table
from bench.latency.setup import (
    CASES,
    PAPER_FETCH,
    SEED,
    SHAPE,
    Case,
    Env,
    hier_placement,
    push,
    write_banks,
    write_profiles,
)
from tiers import load_profiles


async def run(args: argparse.Namespace, env: Env) -> dict[str, Any]:
    t0 = time.perf_counter()
    fetch = int(args.fetch_mib * 2**20)
    banks = write_banks(env.work / "banks", fetch, args, shape=SHAPE, dtype=args.dtype)
    args.scale = args.scale or PAPER_FETCH / banks.fetch_bytes
    write_profiles(env.profiles_file, load_profiles(args.profiles), args.scale)
    pushes = [(banks.hier, "hier", False)] + [(banks.hier, "hier-all", True)] * any(
        CASES[c].one_disk for c in args.cases
    )
    for bank, prefix, one_disk in pushes:
        place = hier_placement(args.levels, one_disk)
        where = {t: prefix if one_disk else f"{prefix}-{t}" for t in set(place.values())}
        await push(
            bank, env.config({t: env.tier(t, w, None) for t, w in where.items()}, place, ram=0)
        )
    for home in ["disk"] if args.no_flat_cloud else ["disk", "cloud"]:
        await push(
            banks.flat, env.config({home: env.tier(home, f"flat-{home}", None)}, {1: home}, ram=0)
        )
    print(f"banks written and pushed in {time.perf_counter() - t0:.1f} s", flush=True)
    cases = [await run_case(c, args, env, banks) for c in args.cases]
    e2e = None
    if args.e2e:
        print("  e2e: two servers in this process ...", flush=True)
        e2e = await e2e_local(args, env)
    elif args.e2e_url_hier:
        urls = {"hier": args.e2e_url_hier, "flat": args.e2e_url_flat}
        e2e = await e2e_measure(urls, args) | {"mode": "running servers"}
    return {
        "banks": banks.describe(),
        "fetch_bytes": banks.fetch_bytes,
        "scale": args.scale,
        "cases": cases,
        "e2e": e2e,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.latency", description=__doc__.split("\n\n")[0]
    )
    add = p.add_argument
    add("--fetch-mib", type=float, default=4.0, help="bytes fetched per prompt (MiB)")
    add("--levels", type=int, default=3)
    add("--branching", type=int, default=4)
    add("--dtype", choices=("float32", "bfloat16"), default="float32")
    add("--cases", default="seed,seed-cloud-20ms,seed-one-disk,real")
    add(
        "--scale",
        type=float,
        default=None,
        help="divides emulated bandwidths; default 3.194 GB / our fetch",
    )
    add("--profiles", type=Path, default=None, help="more device profiles (TOML or JSON)")
    add("--profile-set", default=None, help="case `user`: flash=NAME,disk=NAME,cloud=NAME")
    add("--prompts", type=int, default=48, help="measured prompts per stream")
    add("--warmup", type=int, default=32, help="warm-up prompts before each warm stream")
    add("--cloud-prompts", type=int, default=10, help="cold prompts of the flat bank on the cloud")
    add("--no-flat-cloud", action="store_true", help="no flat bank on the cloud")
    add("--warm-leaves", type=int, default=8, help="deepest blocks the RAM budget holds")
    add("--run", type=int, default=None, help="related prompts per run (default: branching)")
    add("--calib-reps", type=int, default=20, help="reads per size calibrating a real tier")
    add("--e2e", action="store_true", help="time to first token, two servers in this process")
    add(
        "--e2e-url-hier",
        default=None,
        help="a running server of a hier bank (--levels, --branching)",
    )
    add("--e2e-url-flat", default=None, help="a running server of the matching flat bank")
    add("--e2e-requests", type=int, default=16)
    add("--e2e-fetch-kib", type=int, default=512)
    add("--seed", type=int, default=0)
    add("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    add("--quick", action="store_true", help="tiny banks, few prompts: a smoke test")
    add("--out", type=Path, default=Path("bench/out/latency"))
    args = p.parse_args()
    if args.quick:
        args.fetch_mib, args.prompts, args.warmup, args.cloud_prompts = 0.5, 4, 4, 2
        args.calib_reps = 3
        if "--e2e-requests" not in sys.argv:
            args.e2e_requests = 3
        if "--cases" not in sys.argv:
            args.cases = "seed,real"
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.profile_set:
        chosen = dict(kv.partition("=")[::2] for kv in args.profile_set.split(","))
        if unknown := set(chosen) - set(SEED):
            p.error(f"--profile-set: unknown tiers {sorted(unknown)}; use flash, disk, cloud")
        if missing := set(chosen.values()) - set(load_profiles(args.profiles)):
            p.error(f"--profile-set: unknown profiles {sorted(missing)}; define them in --profiles")
        CASES["user"] = Case(f"your profiles: {args.profile_set}", SEED | chosen)
        args.cases += ["user"] * ("user" not in args.cases)
    if unknown := set(args.cases) - set(CASES):
        p.error(f"--cases: unknown {sorted(unknown)}; choose from {sorted(CASES)}")
    if bool(args.e2e_url_hier) != bool(args.e2e_url_flat):
        p.error("--e2e-url-hier and --e2e-url-flat go together")
    if args.levels < 2 or args.branching < 2:
        p.error("--levels and --branching must be >= 2")
    args.run = args.run or args.branching
    return args


def main() -> None:
    args = parse_args()
    info = machine() | {"loop": args.loop}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)  # MemTotal, in kB
    command = command_line()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info.get('ram_gib')} GiB RAM, "
        f"Python {info['python']}, {args.loop}\ncommand: {command}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hmem-latency-") as tmp, moto_server() as endpoint:
        env = Env(Path(tmp), endpoint)
        result = (uvloop.run if args.loop == "uvloop" else asyncio.run)(run(args, env))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profiles.toml").write_text(env.profiles_file.read_text())
    elapsed = time.perf_counter() - started
    h, f = result["banks"]["hier"], result["banks"]["flat"]
    mib = {name: f"{b['bank_bytes'] / 2**20:.1f} MiB" for name, b in result["banks"].items()}
    print(
        f"\nhier: widths {h['widths']}, blocks {h['block_bytes']} B, bank {mib['hier']}; flat: "
        f"{f['branching']} blocks of {f['block_bytes'][0]} B, bank {mib['flat']}; "
        f"emulated bandwidths / {result['scale']:.1f}"
    )
    for c in result["cases"]:
        shown = ", ".join(
            f"{t} {p['latency_s'] * 1e3:.3g} ms + {p['bandwidth_bytes_s'] / 1e6:.4g} MB/s"
            for t, p in sorted(c["profiles"]["hier"].items())
        )
        print(f"  {c['case']}: {c['title']}; hier tiers: {shown}")
    print(f"\n{table([r for c in result['cases'] for r in c['rows']])}\n")
    if result["e2e"] is not None:
        print(f"{e2e_table(result['e2e'])}\n")
    checks = goals(result["cases"])
    for g in checks:
        met = "met" if g["met"] else "**missed**"
        print(f"goal [{g['case']}] {g['goal']}: {g['value']:.2f}x -> {met}")
    report = {
        "command": command,
        "machine": info,
        "elapsed_s": elapsed,
        "goals": checks,
        "args": {k: str(v) for k, v in vars(args).items()},
    } | result
    (args.out / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    pngs = plot(result["cases"], args.out)
    print(f"wrote {args.out / 'latency.json'}, {', '.join(map(str, pngs))} ({elapsed:.0f} s)")
