"""What a workload allows, whatever the router does: RAM hit rates replayed offline, no server.

For the measured requests of a workload (after its warm-up), each as the list of its blocks:

- `ceiling`: the hit rate of one unbounded cache that has seen every earlier request. No
  routing does better: a block's first use is a miss on any replica (a compulsory miss).
- `lru`: each of N replicas keeps an LRU cache of `capacity` bytes, and request i goes to
  replica `assignment[i]`: one at random (what power of two choices does when loads are even),
  or its level-1 subtree's home (`placement.homes`: what residency routing does when nothing
  spills).

The served caches evict by GreedyDual-Size-Frequency, not LRU, so these are reference points for
reading the measured figures, not predictions of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from bench.cluster.load import Job, node_ids
from server.cluster.placement import homes as balanced_homes

Block = tuple[int, int]  # (level, node id)


def _blocks(jobs: Sequence[Job], branching: int) -> list[list[Block]]:
    return [node_ids(job.path, branching) for job in jobs]


def ceiling(requests: Sequence[list[Block]], warmup: int) -> float:
    seen: set[Block] = set()
    hits = total = 0
    for i, blocks in enumerate(requests):
        if i >= warmup:
            total += len(blocks)
            hits += sum(b in seen for b in blocks)
        seen.update(blocks)
    return hits / total if total else float("nan")


def lru(
    requests: Sequence[list[Block]],
    warmup: int,
    *,
    block_bytes: dict[int, int],
    replicas: int,
    capacity: int,
    assignment: Sequence[int],
) -> float:
    caches: list[OrderedDict[Block, int]] = [OrderedDict() for _ in range(replicas)]
    used = [0] * replicas
    hits = total = 0
    for i, (r, blocks) in enumerate(zip(assignment, requests, strict=True)):
        cache = caches[r]
        for b in blocks:
            hit = b in cache
            if i >= warmup:
                total += 1
                hits += hit
            if hit:
                cache.move_to_end(b)
                continue
            size = block_bytes[b[0]]
            if size > capacity:
                continue
            while used[r] + size > capacity:
                _, freed = cache.popitem(last=False)
                used[r] -= freed
            cache[b] = size
            used[r] += size
    return hits / total if total else float("nan")


def references(
    jobs: Sequence[Job],
    warmup: int,
    *,
    branching: int,
    block_bytes: dict[int, int],
    replicas: int,
    capacity: int,
    trials: int = 8,
) -> dict[str, float]:
    """The ceiling, and LRU replays of random and subtree-home routing (means over `trials`
    draws of the random choices and of the replica ids the homes hash with)."""
    requests = _blocks(jobs, branching)
    random_rates: list[float] = []
    home_rates: list[float] = []
    for t in range(trials):
        rng = np.random.default_rng(t)
        picks = [int(r) for r in rng.integers(0, replicas, size=len(jobs))]
        ids = [f"replica-{t}-{k}" for k in range(replicas)]
        home = balanced_homes(tuple(ids), branching)  # the router's homes (`placement.homes`)
        at_home = [ids.index(home[job.path[0]]) for job in jobs]
        for rates, assignment in ((random_rates, picks), (home_rates, at_home)):
            rates.append(
                lru(requests, warmup, block_bytes=block_bytes,
                    replicas=replicas, capacity=capacity, assignment=assignment)
            )  # fmt: skip
    ceil = ceiling(requests, warmup)
    rand = float(np.mean(random_rates))
    return {
        "ceiling": ceil,
        "lru_random": rand,
        "lru_subtree_home": float(np.mean(home_rates)),
        "max_hit_rate_ratio": ceil / rand if rand else float("inf"),
    }
