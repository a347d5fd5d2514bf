"""Which replica should serve a path: the ranking behind residency routing, free of Ray.

A replica is described by what its RAM cache holds (`Residency`: the nodes of each memory level)
and how many requests it has in flight. For a request's path (its node id at every level), the
ranking is, in order (docs/cluster.md, "Routing"):

1. Replicas that hold the longest prefix of the path (level 1, then level 2, ...), the one with
   fewest requests in flight first. A level-1 subtree that no replica holds has a *home*
   (`homes`): rendezvous hashing of the subtree over the live replica ids, bounded so that no
   replica is home to more than its share of the subtrees (plain rendezvous hashing gave one
   of 4 replicas 6 to 8 of 16 subtrees). Every ingress computes the same homes without talking
   to the others, and a replica that dies or joins moves few of them.
2. A preferred replica with `spill` or more requests in flight beyond the least loaded one is
   passed over for the least loaded: a hot subtree is then held by two replicas, then three, as
   its load needs, rather than pinned to one (the multiplexing pitfall, docs/cluster.md).
3. Everything else, by held prefix, then load: the fallbacks when the first rank is full.

Requests without a path (memory off, the tokenizer, the models list) go to the less loaded of
two replicas drawn at random, Ray Serve's own power of two choices.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

How = Literal["resident", "home", "spill", "any"]


@dataclass(frozen=True, slots=True)
class Residency:
    """The nodes of each memory level that one replica's RAM cache holds."""

    nodes: Mapping[int, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, resident: Mapping[int | str, Sequence[int]]) -> Residency:
        """From `MemoryResolver.residency()`, or its JSON form (levels as strings)."""
        return cls({int(level): frozenset(nodes) for level, nodes in resident.items()})

    def depth(self, path: Sequence[tuple[int, int]]) -> int:
        """How many of `path`'s (level, node) pairs it holds, from the first, without a gap."""
        held = 0
        for level, node in path:
            if node not in self.nodes.get(level, ()):
                break
            held += 1
        return held

    def merged(self, seen: Mapping[int, set[int]]) -> Residency:
        """This residency with `seen` (recently served, not yet reported) added."""
        if not seen:
            return self
        out = {level: set(nodes) for level, nodes in self.nodes.items()}
        for level, nodes in seen.items():
            out.setdefault(level, set()).update(nodes)
        return Residency({level: frozenset(nodes) for level, nodes in out.items()})


@dataclass(frozen=True, slots=True)
class Candidate:
    """One live replica as the ranking sees it."""

    id: str
    residency: Residency
    in_flight: int  # requests sent and not finished; 0 when unknown


@dataclass(frozen=True, slots=True)
class Ranking:
    """Replica ids in ranks (the first preferred) and why the first rank was chosen."""

    ranks: list[list[str]]
    how: How
    preferred: frozenset[str]  # the replicas that hold the path or are its home


def _weight(key: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()


def rendezvous(key: str, ids: Sequence[str]) -> str:
    """The id that wins highest-random-weight hashing of `key`: stable while it stays alive."""
    return max(ids, key=lambda replica: _weight(key, replica))


@functools.lru_cache(maxsize=64)
def homes(ids: tuple[str, ...], subtrees: int, level: int = 1) -> tuple[str, ...]:
    """The home replica of each of `subtrees` subtrees of `level`: rendezvous hashing, bounded.

    Subtree by subtree, in order, each goes to the replica of highest weight that is home to
    fewer than ceil(subtrees / replicas) so far, so every replica is home to its share.
    """
    ordered = sorted(ids)
    cap = -(-subtrees // len(ordered))
    count = dict.fromkeys(ordered, 0)
    out = []
    for s in range(subtrees):
        key = f"L{level}:{s}"
        for replica in sorted(ordered, key=lambda r: _weight(key, r), reverse=True):
            if count[replica] < cap:
                count[replica] += 1
                out.append(replica)
                break
    return tuple(out)


def home_of(path: Sequence[tuple[int, int]], ids: Sequence[str], subtrees: int) -> str:
    """The home of `path`'s first-level subtree among `ids` (`subtrees`: how many there are at
    that level; 0 if unknown: plain rendezvous hashing)."""
    level, node = path[0]
    if subtrees > 0 and 0 <= node < subtrees:
        return homes(tuple(sorted(ids)), subtrees, level)[node]
    return rendezvous(f"L{level}:{node}", sorted(ids))


def rank(
    path: Sequence[tuple[int, int]] | None,
    candidates: Sequence[Candidate],
    *,
    spill: int,
    subtrees: int = 0,
    rng: random.Random | None = None,
) -> Ranking:
    """The ranking of `candidates` for a request on `path` ((level, node) pairs, level 1 first).

    `spill`: requests in flight beyond the least loaded replica at which a preferred replica is
    passed over (at least 1). `subtrees`: the number of subtrees at the path's first level (the
    bank's branching), for balanced homes; 0: plain rendezvous hashing.
    """
    if not candidates:
        return Ranking([], "any", frozenset())
    if not path:
        pick = (rng or random).sample(list(candidates), min(2, len(candidates)))
        return Ranking([[c.id for c in pick]], "any", frozenset())
    depth = {c.id: c.residency.depth(path) for c in candidates}
    load = {c.id: c.in_flight for c in candidates}
    home = home_of(path, list(depth), subtrees)
    best = max(depth.values())
    if best > 0:
        preferred = [c.id for c in candidates if depth[c.id] == best]
        how: How = "resident"
    else:
        preferred = [home]
        how = "home"
    least = min(load.values())
    ready = sorted((r for r in preferred if load[r] - least < spill), key=lambda r: load[r])
    if not ready:
        # Every replica that holds the path is `spill` requests busier than the least loaded:
        # the least loaded takes it (and then holds it too).
        how = "spill"
        ready = [min(load, key=lambda r: (load[r], -depth[r], r != home))]
    rest = sorted(
        (c.id for c in candidates if c.id not in ready),
        key=lambda r: (-depth[r], r != home, load[r]),
    )
    return Ranking([ready, rest] if rest else [ready], how, frozenset(preferred))
