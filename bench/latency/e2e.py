"""End-to-end mode of bench.latency (`--e2e`, `--e2e-url-*`): time to first token over HTTP.

The hier and flat banks are served by two servers (in this process under uvicorn, or already
running); each request's first generated token is timed with the hier bank, the flat bank and no
memory, interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.common.paths import leaf_path
from bench.common.servers import local_server
from bench.latency.measure import stats_ms
from bench.latency.setup import (
    DEMO_SHAPE,
    PAPER_FETCH,
    SEED,
    Env,
    hier_placement,
    push,
    write_banks,
    write_profiles,
)
from tiers import load_profiles


async def ttft(client: httpx.AsyncClient, url: str, memory: dict[str, Any]) -> tuple[float, float]:
    """Seconds to the first SSE chunk with generated text; the server's memory fetch_ms."""
    body = {
        "prompt": "The atomic number of Iron is",
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
        "memory": memory,
    }
    sent, first, fetch_ms = time.perf_counter(), None, 0.0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            fetch_ms = (chunk.get("memory") or {}).get("fetch_ms", fetch_ms)
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("no generated text in the stream")
    return first - sent, fetch_ms


async def e2e_measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """TTFT with the hier bank, the flat bank, and no memory (the hier server), interleaved;
    distinct leaves first, so that a server's cache helps as little as it can."""
    levels, b, rng = args.levels, args.branching, random.Random(f"{args.seed}-e2e")
    leaves = rng.sample(range(b**levels), min(args.e2e_requests, b**levels))
    leaves += [rng.randrange(b**levels) for _ in range(args.e2e_requests - len(leaves))]
    memory: dict[str, Callable[[int], dict[str, Any]]] = {
        "hier": lambda leaf: {"path": leaf_path(leaf, levels, b)},
        "flat": lambda leaf: {"path": [leaf]},
        "off": lambda leaf: {"mode": "off"},
    }
    urls = urls | {"off": urls["hier"]}
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in memory}
    async with httpx.AsyncClient(timeout=60) as client:
        for url in set(urls.values()):  # the first requests load kernels: not timed
            await ttft(client, url, {"mode": "off"})
        names = list(memory)
        for i, leaf in enumerate(leaves):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                got[name].append(await ttft(client, urls[name], memory[name](leaf)))
    stats = {
        name: stats_ms([x[0] for x in xs])
        | {"server_fetch_mean_ms": statistics.fmean(x[1] for x in xs)}
        for name, xs in got.items()
    }
    h, f, o = (stats[k]["mean_ms"] for k in ("hier", "flat", "off"))
    return {
        "ttft": stats,
        "flat_over_hier": f / h,
        "memory_part_flat_over_hier": (f - o) / (h - o) if h > o else None,
    }


async def e2e_local(args: argparse.Namespace, env: Env) -> dict[str, Any]:
    from server.defaults import DEMO_BANK
    from server.settings import load_settings

    root = env.work / "e2e"
    banks = write_banks(
        root,
        args.e2e_fetch_kib << 10,
        args,
        shape=DEMO_SHAPE,
        dtype="float32",
        anchor=DEMO_BANK / "anchor",
    )
    scale, pf = PAPER_FETCH / banks.fetch_bytes, root / "profiles.toml"
    write_profiles(pf, load_profiles(args.profiles), scale)
    place = hier_placement(args.levels)
    tiers = {t: env.tier(t, f"e2e-hier-{t}", f"{SEED[t]}@scaled") for t in set(place.values())}
    flat = {"disk": env.tier("disk", "e2e-flat", f"{SEED['disk']}@scaled")}
    configs = {
        "hier": env.config(tiers, place, ram=0, profiles_file=pf),
        "flat": env.config(flat, {1: "disk"}, ram=0, profiles_file=pf),
    }
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for name, config in configs.items():
            bank = getattr(banks, name)
            await push(bank, config)
            state = root / f"state-{name}"
            settings = load_settings(bank=bank.path, store=config, data_dir=state, warmup=False)
            urls[name] = stack.enter_context(local_server(settings))
        result = await e2e_measure(urls, args)
    return result | {"mode": "in-process", "scale": scale, "banks": banks.describe()}
