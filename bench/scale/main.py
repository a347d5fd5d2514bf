"""Paper scale on one machine: a bank far larger than the RAM cache, served from real tiers, and
what memory costs next to a real model step (docs/results.md, "Paper scale").

Serves a bank written by `hmem bank generate` (level 1 in LMDB, levels 2-3 in a directory,
level 4 in an S3 server: `rclone serve s3` over a directory, started here unless `--endpoint-url`
names one) with `hmem serve` in its own process, and reports side by side in one run:

  - process memory: the server's peak anonymous RSS against anchor bytes + RAM cache budget
    (goal <= 1.2x), beside its file-backed RSS (page cache of mapped files), measured with the
    cache full: distinct paths are prefetched until it evicts, before the workload;
  - per level: RAM hit rate, fetch latency p50/p99 of a Zipf workload over the tree's leaves;
  - the cold fetch of a path against the analytic limit from cold raw reads of each tier
    (goal <= 1.1x);
  - time to first token with a warm path against the anchor alone (goal <= 1.10x), decode
    tokens/s with memory against the anchor alone (goal >= 0.90x);
  - N concurrent streams with distinct paths against one at a time (goal >= 3x);
  - hmem's HTTP decode against `transformers` on the same weights and dtype (goal >= 1.2x).

    python -m bench.scale --bank /data/scale/bank --s3-root /data/scale/s3 [--ram-cache 6GiB]
    python -m bench.scale --quick            # generates a small bank in a temp dir (the tests)

Writes scale.json, scale.md and scale.png under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx
from pydantic import ByteSize, TypeAdapter

from bench.common.machine import machine
from bench.common.paths import leaf_path
from bench.scale.measure import (
    analytic_limit,
    cache_metrics,
    cold_path_sets,
    cold_paths,
    fill_cache,
    hf_decode,
    level_stats,
    streams,
    tier_devices,
    ttft_and_decode,
    zipf_workload,
)
from bench.scale.report import GOALS, markdown, plot, verdicts
from bench.scale.setup import TierFiles, anchor_bytes, serve_process, serving_settings
from server.bank.generate import generate_bank
from server.bank.manifest import load_manifest
from server.bank.paths import ANCHOR_DIR
from server.bank.placement import placement_from_flags
from server.bank.shapes import SHAPES
from tiers.config import StoreConfig
from tiers.rclone_server import RcloneS3Server


def prompts() -> list[str]:
    """Prompts not written for this bench: the first sentence of standard-library docstrings."""
    import importlib

    names = "json os re csv math heapq bisect string textwrap difflib pathlib shutil glob zipfile"
    out = []
    for name in names.split():
        doc = (importlib.import_module(name).__doc__ or "").strip()
        first = " ".join(doc.split("\n\n")[0].split())
        if first:
            out.append(first[:160])
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bank", type=Path, help="a bank from `hmem bank generate`")
    p.add_argument("--s3-root", type=Path, help="directory of the S3 objects (rclone serves it)")
    p.add_argument("--endpoint-url", help="a running S3 endpoint instead of --s3-root's server")
    p.add_argument("--ram-cache", default="6GiB", help="the server's RAM cache budget")
    p.add_argument("--context-length", type=int, default=512, help="KV cache positions")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument(
        "--fill-paths", type=int, default=20000, help="most paths prefetched to fill the cache"
    )
    p.add_argument("--requests", type=int, default=400, help="requests of the Zipf workload")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent over leaves")
    p.add_argument("--concurrency", type=int, default=4, help="Zipf workload clients")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams")
    p.add_argument("--reps", type=int, default=8, help="repetitions of each comparison")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per decode measurement")
    p.add_argument(
        "--cold-paths", type=int, default=8, help="cold paths read raw, and as many served"
    )
    p.add_argument("--torch-threads", type=int, help="the server's and HF's torch threads")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--quick", action="store_true", help="small generated bank, few requests")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="re-render a saved scale.json (limit, verdicts, table, plot) without measuring; "
        "with --bank, the cold-path limit is recomputed from its raw reads",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out/scale"))
    args = p.parse_args(argv)
    if args.quick:
        args.ram_cache, args.context_length, args.max_batch = "256KiB", 128, 4
        args.requests, args.concurrency, args.streams, args.reps = 24, 2, 4, 2
        args.max_tokens, args.cold_paths, args.fill_paths = 8, 2, 200
    elif args.bank is None and args.from_json is None:
        p.error("--bank is required (or --quick)")
    return args


S3_ENV = {"AWS_DEFAULT_REGION": "us-east-1"}


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ram_cache = int(TypeAdapter(ByteSize).validate_python(args.ram_cache))
    server: RcloneS3Server | None = None
    try:
        if args.quick:
            server = RcloneS3Server(work / "s3")
            server.start()
            args.s3_root = work / "s3"
            args.bank = work / "bank"
            os.environ.update(_credentials(server))
            config = placement_from_flags(
                [f"1=lmdb:{work}/flash", f"2={work}/disk", f"3={work}/disk", "4=s3://hmem/quick"],
                bank_id="small",
                endpoint_url=server.endpoint_url,
                region="us-east-1",
            )
            await generate_bank(args.bank, SHAPES["small"], config, progress=False)
        elif args.endpoint_url is None:
            if args.s3_root is None:
                raise SystemExit("give --s3-root (the S3 objects' directory) or --endpoint-url")
            server = RcloneS3Server(args.s3_root)
            server.start()
            os.environ.update(_credentials(server))
        endpoint = args.endpoint_url or (server.endpoint_url if server else None)
        return await measure(args, work, ram_cache, endpoint)
    finally:
        if server is not None:
            server.stop()


def _credentials(server: RcloneS3Server) -> dict[str, str]:
    s = server.client_settings()
    return S3_ENV | {
        "AWS_ACCESS_KEY_ID": s["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": s["secret_access_key"],
    }


async def measure(
    args: argparse.Namespace, work: Path, ram_cache: int, endpoint: str | None
) -> dict[str, Any]:
    bank: Path = args.bank
    m = load_manifest(bank)
    settings = serving_settings(
        bank,
        endpoint_url=endpoint,
        ram_cache=ram_cache,
        context_length=args.context_length,
        max_batch=args.max_batch,
        data_dir=work / "data",
    )
    store = StoreConfig.model_validate(settings["store"])
    files = TierFiles(settings["store"], args.s3_root)
    raw_set, served_set = cold_path_sets(m, args.cold_paths)
    result: dict[str, Any] = {
        "machine": machine(),
        "bank": {
            "id": m.bank_id,
            "levels": m.levels,
            "branching": m.branching,
            "widths": m.widths,
            "bank_bytes": m.bank_bytes(),
            "path_bytes": m.fetch_bytes(),
            "level_block_bytes": {lvl: m.fetch_bytes([lvl]) for lvl in m.memory_levels()},
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"ram_cache": ram_cache},
    }
    texts = prompts()
    with serve_process(settings, work, env={}, torch_threads=args.torch_threads) as srv:
        result["memory"] = {"anchor_bytes": anchor_bytes(bank), "ram_cache": ram_cache}
        async with httpx.AsyncClient(base_url=srv.url, timeout=600) as c:
            raw, served = await cold_paths(c, store, m, files, raw_set, served_set)
            devices = tier_devices(settings["store"], args.s3_root)
            result["cold"] = analytic_limit(store, raw, devices) | {
                "raw_s": raw,
                "served_s": served,
            }
            result["fill"] = await fill_cache(c, m, concurrency=4, limit=args.fill_paths)
            w = await zipf_workload(
                c, m, texts, n=args.requests, zipf_s=args.zipf,
                concurrency=args.concurrency, max_tokens=16,
            )  # fmt: skip
            result["workload"] = {
                "requests": w.requests,
                "seconds": w.seconds,
                "tokens": w.tokens,
                "levels": level_stats(w, m.levels),
                "ram_hit_rate": sum(b["cached"] for b in w.blocks) / len(w.blocks),
            }
            hot = leaf_path(0, m.levels, m.branching)
            result["serving"] = await ttft_and_decode(
                c, texts[0], hot, reps=args.reps, max_tokens=args.max_tokens
            )
            paths = [leaf_path(i * 7919, m.levels, m.branching) for i in range(args.streams)]
            result["streams"] = await streams(
                c, texts, paths, max_tokens=args.max_tokens, reps=max(2, args.reps // 4)
            )
            result["cache_end"] = await cache_metrics(c)
            result["memory"] |= {
                "peak_anon": srv.memory.peak_anon,
                "peak_file": srv.memory.peak_file,
                "end": srv.memory.read(),
                "samples": srv.memory.samples[:: max(1, len(srv.memory.samples) // 400)],
            }
            partial = args.out / "scale.partial.json"  # kept if what follows fails
            partial.write_text(json.dumps(result, indent=2, default=str))
            if not args.no_hf:
                if args.torch_threads is not None:
                    import torch

                    torch.set_num_threads(args.torch_threads)
                result["hf"] = await hf_decode(
                    c, bank / ANCHOR_DIR, texts[1], reps=args.reps, max_tokens=args.max_tokens
                )
    result["verdicts"] = verdicts(result)
    return result


def rerender(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(args.from_json.read_text())
    for section in ("level_block_bytes",):
        result["bank"][section] = {int(k): v for k, v in result["bank"][section].items()}
    if args.bank is not None:
        store = json.loads((args.bank / "serve.json").read_text())["store"]
        raw = {int(k): v for k, v in result["cold"]["raw_s"].items()}
        limit = analytic_limit(
            StoreConfig.model_validate(store), raw, tier_devices(store, args.s3_root)
        )
        result["cold"] = {k: v for k, v in result["cold"].items() if k != "per_tier_s"} | limit
    result["verdicts"] = verdicts(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        result = rerender(args)
    else:
        with tempfile.TemporaryDirectory(prefix="hmem-scale-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    (args.out / "scale.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (args.out / "scale.md").write_text(text)
    plot(result, args.out / "scale.png")
    print(text)
    print(f"goals: {', '.join(GOALS)}; wrote {args.out}/scale.json, scale.md, scale.png")
    return 0
