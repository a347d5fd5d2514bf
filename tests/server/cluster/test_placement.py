"""Residency ranking (`server.cluster.placement`): prefixes, homes, spills, and their stability."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from server.cluster.placement import Candidate, Residency, home_of, homes, rank, rendezvous

# A 3-level path with branching 4: child indices (2, 1, 3) are nodes 2, 9, 39.
PATH = ((1, 2), (2, 9), (3, 39))


def cand(rid: str, held: dict[int, set[int]] | None = None, in_flight: int = 0) -> Candidate:
    residency = Residency.of({lv: sorted(n) for lv, n in (held or {}).items()})
    return Candidate(rid, residency, in_flight)


def test_depth_counts_the_held_prefix_without_a_gap() -> None:
    assert Residency.of({}).depth(PATH) == 0
    assert Residency.of({1: [2], 2: [9], 3: [39]}).depth(PATH) == 3
    assert Residency.of({1: [2], 2: [9]}).depth(PATH) == 2
    # Level 2 missing: level 3 alone does not count.
    assert Residency.of({1: [2], 3: [39]}).depth(PATH) == 1
    assert Residency.of({1: [3], 2: [9], 3: [39]}).depth(PATH) == 0
    # The JSON form of a report (levels as strings) reads the same.
    assert Residency.of({"1": [2], "2": [9]}).depth(PATH) == 2


def test_the_replica_holding_the_longest_prefix_comes_first() -> None:
    got = rank(
        PATH,
        [cand("a", {1: {2}}), cand("b", {1: {2}, 2: {9}}), cand("c")],
        spill=4,
    )
    assert got.how == "resident"
    assert got.ranks[0] == ["b"]
    assert got.ranks[1][0] == "a"  # next best prefix first among the fallbacks
    assert got.preferred == {"b"}


def test_holders_of_equal_prefixes_are_ordered_by_load() -> None:
    got = rank(PATH, [cand("a", {1: {2}}, 3), cand("b", {1: {2}}, 1)], spill=4)
    assert got.ranks[0] == ["b", "a"]


def test_an_unheld_subtree_goes_to_its_home_on_every_ingress() -> None:
    ids = ["r0", "r1", "r2", "r3"]
    home = rendezvous("L1:2", ids)
    for order in (ids, ids[::-1]):
        got = rank(PATH, [cand(r) for r in order], spill=4)
        assert got.how == "home"
        assert got.ranks[0] == [home]


def test_homes_spread_over_replicas_and_move_only_from_a_dead_one() -> None:
    ids = [f"replica-{i}" for i in range(4)]
    homes = {s: rendezvous(f"L1:{s}", ids) for s in range(256)}
    counts = Counter(homes.values())
    assert set(counts) == set(ids)
    assert min(counts.values()) > 256 / 4 / 2  # no replica starved of subtrees
    survivors = ids[:3]
    moved = {s for s in homes if rendezvous(f"L1:{s}", survivors) != homes[s]}
    assert moved == {s for s, h in homes.items() if h == "replica-3"}


@pytest.mark.parametrize(("replicas", "subtrees"), [(2, 8), (3, 16), (4, 16), (4, 256)])
def test_balanced_homes_give_every_replica_its_share(replicas: int, subtrees: int) -> None:
    ids = tuple(f"SERVE_REPLICA::hmem#EngineReplica#{i:08x}" for i in range(replicas))
    counts = Counter(homes(ids, subtrees))
    share = -(-subtrees // replicas)
    assert set(counts) == set(ids)
    assert max(counts.values()) <= share
    assert min(counts.values()) >= subtrees - share * (replicas - 1)
    # The same homes whatever order the ids come in (every ingress agrees).
    assert homes(tuple(reversed(ids)), subtrees) == homes(ids, subtrees)


def test_balanced_homes_move_few_subtrees_when_a_replica_dies() -> None:
    ids = tuple(f"replica-{i}" for i in range(4))
    before = homes(ids, 64)
    after = homes(ids[:3], 64)
    lost = {s for s, h in enumerate(before) if h == "replica-3"}
    moved = {s for s in range(64) if before[s] != after[s]}
    assert lost <= moved
    assert len(moved) <= 2 * len(lost)  # the lost ones, and few others for balance


def test_rank_uses_balanced_homes_when_the_subtree_count_is_known() -> None:
    ids = ["a", "b", "c", "d"]
    for node in range(16):
        path = ((1, node), (2, node * 4))
        want = home_of(path, ids, 16)
        assert want == homes(tuple(ids), 16)[node]
        assert rank(path, [cand(r) for r in ids], spill=4, subtrees=16).ranks[0] == [want]


def test_a_busy_holder_spills_to_the_least_loaded() -> None:
    held = {1: {2}, 2: {9}}
    busy = [cand("a", held, in_flight=9), cand("b", {}, in_flight=2), cand("c", {}, 5)]
    got = rank(PATH, busy, spill=4)
    assert got.how == "spill"
    assert got.ranks[0] == ["b"]
    assert got.preferred == {"a"}
    # Below the margin the holder keeps it.
    calm = [cand("a", held, in_flight=5), cand("b", {}, in_flight=2)]
    assert rank(PATH, calm, spill=4).ranks[0] == ["a"]


def test_of_two_holders_only_the_busy_one_is_passed_over() -> None:
    held = {1: {2}}
    got = rank(PATH, [cand("a", held, 8), cand("b", held, 1), cand("c", {}, 0)], spill=4)
    assert got.how == "resident"
    assert got.ranks[0] == ["b"]


def test_requests_without_a_path_go_to_two_random_replicas() -> None:
    rng = random.Random(0)
    seen = Counter()
    for _ in range(200):
        got = rank(None, [cand(r) for r in "abcd"], spill=4, rng=rng)
        assert got.how == "any"
        assert len(got.ranks) == 1
        assert len(got.ranks[0]) == 2
        seen.update(got.ranks[0])
    assert set(seen) == set("abcd")


def test_no_candidates_no_ranks() -> None:
    assert rank(PATH, [], spill=4).ranks == []


@pytest.mark.parametrize("spill", [1, 2, 8])
def test_every_candidate_appears_once(spill: int) -> None:
    cands = [cand("a", {1: {2}}, 7), cand("b", {}, 0), cand("c", {1: {2}, 2: {9}}, 3)]
    got = rank(PATH, cands, spill=spill)
    flat = [r for ranked in got.ranks for r in ranked]
    assert sorted(flat) == ["a", "b", "c"]
