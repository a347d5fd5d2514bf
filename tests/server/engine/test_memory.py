"""Memory resolution over a real store: a 3-level random bank on LMDB (level 1) and disk (2, 3).

Routing, explicit paths, modes, level subsets, key policies, the blocklist (blocked blocks are
never read from any tier), missing blocks, prefetch and residency, all through the real
`TieredStore` and its Prometheus counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from server.bank import Bank, write_random_bank
from server.bank.push import push_bank
from server.bank.router_file import ROUTER_NAME
from server.engine.blocklist import Blocklist
from server.engine.memory import (
    BlockReport,
    Degraded,
    Fallback,
    MemoryForbiddenError,
    MemoryRequest,
    MemoryRequestError,
    MemoryResolver,
)
from server.model.memory import MemoryBlock
from server.routing.tree import Router
from server.settings import KeyPolicy
from tiers import BlockKey, StoreConfig, TieredStore, build_store

BANK_ID = "mem"
LEVELS, B = 3, 4
WIDTHS = (12, 8, 4)  # distinct, so a block's level shows in its shape
TIER_RESULTS = ("hit", "miss", "error", "corrupt", "timeout", "skipped")
TEXT = "the atomic number of carbon is six"


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Bank:
    out = tmp_path_factory.mktemp("memory") / "bank"
    write_random_bank(out, bank_id=BANK_ID, levels=LEVELS, branching=B, widths=WIDTHS, seed=3)
    return Bank.open(out, require_anchor=False)


@dataclass
class Served:
    bank: Bank
    store: TieredStore[MemoryBlock]
    router: Router
    blocklist: Blocklist

    def resolver(self, fallback: Fallback = "generic") -> MemoryResolver:
        m = self.bank.manifest
        return MemoryResolver(
            bank_id=m.bank_id,
            router=self.router,
            store=self.store,
            memory_levels=m.memory_levels(),
            branching=m.branching,
            generic={level: g for level in m.memory_levels() if (g := self.bank.generic(level))},
            blocklist=self.blocklist,
            fallback=fallback,
        )

    def reads(self, level: int, result: str | None = None) -> float:
        """Reads sent to any tier for blocks of `level` (of one result, or all)."""
        registry = self.store.metrics.registry
        total = 0.0
        for tier in self.store.tiers:
            for r in TIER_RESULTS if result is None else (result,):
                labels = {"tier": tier, "level": str(level), "result": r}
                total += registry.get_sample_value("hmem_tier_reads_total", labels) or 0.0
        return total


@pytest.fixture
async def served(bank: Bank, tmp_path: Path) -> AsyncIterator[Served]:
    config = StoreConfig.model_validate(
        {
            "tiers": {
                "flash": {"kind": "lmdb", "path": tmp_path / "flash.lmdb", "sync": False},
                "disk": {"kind": "disk", "root": tmp_path / "disk", "fsync": False},
            },
            "placement": {1: "flash", 2: "disk", 3: "disk"},
            "deadline_s": 30.0,  # generous: a slow machine must not turn a read into "late"
        }
    )
    m = bank.manifest
    store = await build_store(config, codec=bank.codec(), digests=m.digests())
    try:
        await push_bank(bank, store.tiers, config.placement, progress=False)
        router = Router.load(
            bank.path / ROUTER_NAME, m.embedder, branching=m.branching, levels=m.levels
        )
        blocklist = Blocklist(tmp_path / "blocklist.json", levels=m.levels, branching=m.branching)
        yield Served(bank, store, router, blocklist)
    finally:
        await store.aclose()


def nodes_of(path: Sequence[int]) -> tuple[int, ...]:
    nodes, node = [], 0
    for i in path:
        node = node * B + i
        nodes.append(node)
    return tuple(nodes)


def same(a: MemoryBlock, b: MemoryBlock) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def assert_blocks(actual: Sequence[MemoryBlock], expected: Sequence[MemoryBlock]) -> None:
    """The same blocks, in any order (their order does not change the model's output)."""
    assert len(actual) == len(expected)
    unmatched = list(actual)
    for want in expected:
        match = next((i for i, got in enumerate(unmatched) if same(got, want)), None)
        assert match is not None, f"no block of width {want.width} matches"
        unmatched.pop(match)


def bank_blocks(bank: Bank, nodes: Sequence[int], levels: Sequence[int]) -> list[MemoryBlock]:
    return [bank.read_block(BlockKey(BANK_ID, level, nodes[level - 1])) for level in levels]


def generic(bank: Bank, level: int) -> MemoryBlock:
    block = bank.generic(level)
    assert block is not None
    return block


# -- resolution -----------------------------------------------------------------------------------


async def test_auto_mode_fetches_the_routed_paths_blocks_from_their_tiers(
    served: Served,
) -> None:
    resolver = served.resolver()
    routed = served.router.route_texts([TEXT])
    path, nodes = routed.path(0), tuple(routed.node_ids[0].tolist())

    first = await resolver.resolve(TEXT, MemoryRequest())
    assert first.mode == "auto"
    assert (first.path, first.node_ids) == (path, nodes)
    assert nodes == nodes_of(path)
    assert_blocks(first.blocks, bank_blocks(served.bank, nodes, [1, 2, 3]))
    assert [(r.level, r.node, r.tier, r.cached) for r in first.reports] == [
        (1, nodes[0], "flash", False),
        (2, nodes[1], "disk", False),
        (3, nodes[2], "disk", False),
    ]
    assert first.degraded == []
    assert first.blocked == []
    assert [served.reads(level, "hit") for level in (1, 2, 3)] == [1.0, 1.0, 1.0]

    again = await resolver.resolve(TEXT, MemoryRequest())
    assert [(r.level, r.tier, r.cached) for r in again.reports] == [
        (1, "ram", True),
        (2, "ram", True),
        (3, "ram", True),
    ]
    assert_blocks(again.blocks, first.blocks)
    assert [served.reads(level) for level in (1, 2, 3)] == [1.0, 1.0, 1.0]  # no new tier read
    body = again.as_dict()
    assert body["path"] == list(path)
    assert [b["tier"] for b in body["blocks"]] == ["ram"] * 3
    assert body["degraded"] == []
    assert body["blocked"] == []


async def test_an_explicit_path_is_used_as_given(served: Served) -> None:
    path = (3, 1, 2)
    nodes = (3, 3 * B + 1, (3 * B + 1) * B + 2)
    out = await served.resolver().resolve("any text at all", MemoryRequest(path=path))
    assert (out.path, out.node_ids) == (path, nodes)
    assert [(r.level, r.node) for r in out.reports] == [(1, 3), (2, 13), (3, 54)]
    assert_blocks(out.blocks, bank_blocks(served.bank, nodes, [1, 2, 3]))
    assert served.store.cached_keys()
    assert sorted(served.store.cached_keys()) == sorted(
        f"{BANK_ID}/L{level}/{node}" for level, node in zip((1, 2, 3), nodes, strict=True)
    )


async def test_mode_off_uses_no_memory_and_reads_nothing(served: Served) -> None:
    out = await served.resolver().resolve(TEXT, MemoryRequest(mode="off"))
    assert out.blocks == []
    assert out.reports == []
    assert out.degraded == []
    assert out.path is None
    assert sum(served.reads(level) for level in (1, 2, 3)) == 0


async def test_mode_generic_uses_the_generic_blocks_and_reads_nothing(served: Served) -> None:
    out = await served.resolver().resolve(TEXT, MemoryRequest(mode="generic"))
    assert out.mode == "generic"
    assert out.path is None
    assert out.reports == []
    assert_blocks(out.blocks, [generic(served.bank, level) for level in (1, 2, 3)])
    assert sum(served.reads(level) for level in (1, 2, 3)) == 0


async def test_mode_generic_honours_a_levels_subset(served: Served) -> None:
    out = await served.resolver().resolve(TEXT, MemoryRequest(mode="generic", levels=(2,)))
    assert_blocks(out.blocks, [generic(served.bank, 2)])


async def test_a_levels_subset_uses_only_those_levels(served: Served) -> None:
    path = (0, 2, 1)
    nodes = nodes_of(path)
    out = await served.resolver().resolve(TEXT, MemoryRequest(path=path, levels=(1, 3)))
    assert_blocks(out.blocks, bank_blocks(served.bank, nodes, [1, 3]))
    assert [r.level for r in out.reports] == [1, 3]  # level 2: not reported
    assert out.degraded == []  # and not degraded: the request left it out
    assert served.reads(2) == 0
    assert f"{BANK_ID}/L2/{nodes[1]}" not in served.store.cached_keys()


async def test_a_level_the_policy_leaves_out_is_disabled_with_the_generic_fallback(
    served: Served,
) -> None:
    path = (1, 1, 1)
    nodes = nodes_of(path)
    policy = KeyPolicy(levels=[1])
    out = await served.resolver().resolve(TEXT, MemoryRequest(path=path), policy)
    assert [r.level for r in out.reports] == [1]
    assert out.degraded == [Degraded(2, "disabled", "generic"), Degraded(3, "disabled", "generic")]
    assert out.blocked == []
    expected = [*bank_blocks(served.bank, nodes, [1]), *(generic(served.bank, lv) for lv in (2, 3))]
    assert_blocks(out.blocks, expected)
    assert served.reads(2) == served.reads(3) == 0  # a disabled level is not fetched


async def test_fallback_none_leaves_a_disabled_level_without_a_block(served: Served) -> None:
    path = (2, 0, 3)
    policy = KeyPolicy(levels=[1, 3])
    out = await served.resolver(fallback="none").resolve(TEXT, MemoryRequest(path=path), policy)
    assert out.degraded == [Degraded(2, "disabled", "none")]
    assert_blocks(out.blocks, bank_blocks(served.bank, nodes_of(path), [1, 3]))


async def test_a_blocked_cluster_is_never_read_from_any_tier(served: Served) -> None:
    resolver = served.resolver()
    assert served.blocklist.block(1, 2)
    path = (2, 3, 1)  # under the blocked level-1 cluster 2
    out = await resolver.resolve(TEXT, MemoryRequest(path=path))
    assert out.blocked == [1, 2, 3]
    assert out.degraded == [Degraded(level, "blocked", "generic") for level in (1, 2, 3)]
    assert out.reports == []
    assert_blocks(out.blocks, [generic(served.bank, level) for level in (1, 2, 3)])
    # Not one read of any level on any tier, and nothing of the path in RAM.
    assert [served.reads(level) for level in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert served.store.cached_keys() == []
    assert out.as_dict()["blocked"] == [1, 2, 3]

    # With fallback "none", a blocked path has no memory at all.
    bare = await served.resolver(fallback="none").resolve(TEXT, MemoryRequest(path=path))
    assert bare.blocks == []
    assert bare.blocked == [1, 2, 3]

    # A sibling path is served as usual.
    open_path = (1, 3, 1)
    ok = await resolver.resolve(TEXT, MemoryRequest(path=open_path))
    assert ok.blocked == []
    assert ok.degraded == []
    assert_blocks(ok.blocks, bank_blocks(served.bank, nodes_of(open_path), [1, 2, 3]))


async def test_a_blocked_deep_cluster_keeps_the_levels_above_it(served: Served) -> None:
    path = (0, 1, 2)
    nodes = nodes_of(path)
    served.blocklist.block(2, nodes[1])
    out = await served.resolver().resolve(TEXT, MemoryRequest(path=path))
    assert out.blocked == [2, 3]
    assert [r.level for r in out.reports] == [1]
    assert served.reads(2) == served.reads(3) == 0
    assert_blocks(
        out.blocks,
        [*bank_blocks(served.bank, nodes, [1]), generic(served.bank, 2), generic(served.bank, 3)],
    )


async def test_a_cluster_blocked_while_its_fetch_is_in_flight_is_not_applied_or_kept(
    served: Served,
) -> None:
    path = (3, 3, 0)
    resolve = asyncio.create_task(served.resolver().resolve(TEXT, MemoryRequest(path=path)))
    # One turn of the loop runs the resolver up to its first wait: past its blocklist check,
    # with the reads started but not finished (they run on tier threads).
    await asyncio.sleep(0)
    assert not resolve.done()
    served.blocklist.block(1, 3)
    out = await resolve
    assert out.blocked == [1, 2, 3]
    assert out.degraded == [Degraded(level, "blocked", "generic") for level in (1, 2, 3)]
    assert_blocks(out.blocks, [generic(served.bank, level) for level in (1, 2, 3)])
    assert served.store.cached_keys() == []


async def test_evict_blocked_drops_a_newly_blocked_clusters_blocks_from_ram(
    served: Served,
) -> None:
    resolver = served.resolver()
    blocked_path, kept_path = (1, 0, 0), (3, 0, 0)
    await resolver.resolve(TEXT, MemoryRequest(path=blocked_path))
    await resolver.resolve(TEXT, MemoryRequest(path=kept_path))
    assert resolver.residency() == {1: [1, 3], 2: [4, 12], 3: [16, 48]}

    served.blocklist.block(1, 1)
    assert resolver.evict_blocked() == 3
    assert resolver.residency() == {1: [3], 2: [12], 3: [48]}
    assert resolver.evict_blocked() == 0
    # Served again while blocked: the generic stand-ins, and still nothing read or cached.
    reads_before = [served.reads(level) for level in (1, 2, 3)]
    out = await resolver.resolve(TEXT, MemoryRequest(path=blocked_path))
    assert out.blocked == [1, 2, 3]
    assert [served.reads(level) for level in (1, 2, 3)] == reads_before
    assert resolver.residency() == {1: [3], 2: [12], 3: [48]}


async def test_a_block_missing_from_every_tier_falls_back_and_says_missing(
    served: Served,
) -> None:
    path = (2, 2, 2)
    nodes = nodes_of(path)
    key = BlockKey(BANK_ID, 3, nodes[2])
    assert await served.store.tiers["disk"].delete(served.store.storage_name(key))
    out = await served.resolver().resolve(TEXT, MemoryRequest(path=path))
    assert out.degraded == [Degraded(3, "missing", "generic")]
    assert out.blocked == []
    report = {r.level: r for r in out.reports}[3]
    assert (report.node, report.tier, report.cached) == (nodes[2], None, False)
    assert served.reads(3, "miss") == 1
    assert_blocks(out.blocks, [*bank_blocks(served.bank, nodes, [1, 2]), generic(served.bank, 3)])
    assert out.as_dict()["degraded"] == [{"level": 3, "reason": "missing", "fallback": "generic"}]

    bare = await served.resolver(fallback="none").resolve(TEXT, MemoryRequest(path=path))
    assert bare.degraded == [Degraded(3, "missing", "none")]
    assert len(bare.blocks) == 2


async def test_a_key_the_manifest_lists_but_no_tier_holds_is_missing(
    bank: Bank, tmp_path: Path
) -> None:
    """Level 2's home was never pushed to (its blocks went elsewhere): they are missing."""
    config = StoreConfig.model_validate(
        {
            "tiers": {
                "flash": {"kind": "lmdb", "path": tmp_path / "flash.lmdb", "sync": False},
                "disk": {"kind": "disk", "root": tmp_path / "disk", "fsync": False},
                "empty": {"kind": "disk", "root": tmp_path / "empty", "fsync": False},
            },
            "placement": {1: "flash", 2: "empty", 3: "disk"},
            "deadline_s": 30.0,
        }
    )
    m = bank.manifest
    store = await build_store(config, codec=bank.codec(), digests=m.digests())
    try:
        pushed_to = {1: ["flash"], 2: ["disk"], 3: ["disk"]}
        await push_bank(bank, store.tiers, pushed_to, progress=False)
        router = Router.load(
            bank.path / ROUTER_NAME, m.embedder, branching=m.branching, levels=m.levels
        )
        served = Served(bank, store, router, Blocklist(None, levels=LEVELS, branching=B))
        out = await served.resolver().resolve(TEXT, MemoryRequest())
        assert out.degraded == [Degraded(2, "missing", "generic")]
        assert [(r.level, r.tier) for r in out.reports] == [(1, "flash"), (2, None), (3, "disk")]
    finally:
        await store.aclose()


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (MemoryRequest(path=(1, 2)), "memory.path"),
        (MemoryRequest(path=(1, 2, 3, 0)), "memory.path"),
        (MemoryRequest(path=(1, B, 0)), "memory.path"),
        (MemoryRequest(path=(-1, 0, 0)), "memory.path"),
        (MemoryRequest(mode="generic", path=(0, 0, 0)), "memory.path"),
        (MemoryRequest(mode="off", path=(0, 0, 0)), "memory.path"),
        (MemoryRequest(levels=(4,)), "memory.levels"),
        (MemoryRequest(levels=(1, 0)), "memory.levels"),
    ],
    ids=[
        "path-too-short",
        "path-too-long",
        "child-index-is-branching",
        "negative-child-index",
        "path-with-generic",
        "path-with-off",
        "level-past-the-last",
        "level-zero",
    ],
)
async def test_a_bad_memory_request_is_refused_before_any_read(
    served: Served, request_: MemoryRequest, param: str
) -> None:
    resolver = served.resolver()
    with pytest.raises(MemoryRequestError) as caught:
        resolver.check(request_, None)
    assert caught.value.param == param
    assert not isinstance(caught.value, MemoryForbiddenError)
    with pytest.raises(MemoryRequestError):
        await resolver.resolve(TEXT, request_)
    assert sum(served.reads(level) for level in (1, 2, 3)) == 0


@pytest.mark.parametrize(
    ("request_", "policy", "param", "code"),
    [
        (
            MemoryRequest(mode="off"),
            KeyPolicy(modes=["auto"]),
            "memory.mode",
            "memory_mode_forbidden",
        ),
        (
            MemoryRequest(mode="generic"),
            KeyPolicy(modes=["auto", "off"]),
            "memory.mode",
            "memory_mode_forbidden",
        ),
        (
            MemoryRequest(path=(0, 0, 0)),
            KeyPolicy(explicit_path=False),
            "memory.path",
            "memory_path_forbidden",
        ),
    ],
    ids=["off-forbidden", "generic-forbidden", "explicit-path-forbidden"],
)
async def test_what_a_keys_policy_forbids_is_refused(
    served: Served, request_: MemoryRequest, policy: KeyPolicy, param: str, code: str
) -> None:
    resolver = served.resolver()
    with pytest.raises(MemoryForbiddenError) as caught:
        resolver.check(request_, policy)
    assert (caught.value.param, caught.value.code) == (param, code)
    with pytest.raises(MemoryForbiddenError):
        await resolver.resolve(TEXT, request_, policy)
    assert sum(served.reads(level) for level in (1, 2, 3)) == 0


async def test_a_policy_allows_what_it_names(served: Served) -> None:
    resolver = served.resolver()
    policy = KeyPolicy(modes=["auto"], explicit_path=True)
    resolver.check(MemoryRequest(path=(0, 0, 0)), policy)
    out = await resolver.resolve(TEXT, MemoryRequest(), policy)
    assert len(out.blocks) == 3
    assert out.degraded == []


# -- admin ----------------------------------------------------------------------------------------


async def test_prefetch_loads_a_path_into_the_cache(served: Served) -> None:
    resolver = served.resolver()
    path = (3, 2, 1)
    nodes = nodes_of(path)
    assert resolver.residency() == {1: [], 2: [], 3: []}
    reports = await resolver.prefetch(path)
    assert all(isinstance(r, BlockReport) for r in reports)
    assert [(r.level, r.node, r.tier) for r in reports if isinstance(r, BlockReport)] == [
        (1, nodes[0], "flash"),
        (2, nodes[1], "disk"),
        (3, nodes[2], "disk"),
    ]
    assert resolver.residency() == {1: [nodes[0]], 2: [nodes[1]], 3: [nodes[2]]}

    out = await resolver.resolve(TEXT, MemoryRequest(path=path))
    assert all(r.cached and r.tier == "ram" for r in out.reports)


async def test_prefetch_skips_blocked_levels(served: Served) -> None:
    resolver = served.resolver()
    path = (0, 3, 3)
    nodes = nodes_of(path)
    served.blocklist.block(2, nodes[1])
    reports = await resolver.prefetch(path)
    first = reports[0]
    assert isinstance(first, BlockReport)
    assert (first.level, first.node, first.tier, first.cached) == (1, nodes[0], "flash", False)
    assert reports[1:] == [Degraded(2, "blocked", "none"), Degraded(3, "blocked", "none")]
    assert resolver.residency() == {1: [nodes[0]], 2: [], 3: []}
    assert served.reads(2) == served.reads(3) == 0


async def test_a_cluster_blocked_while_its_prefetch_is_in_flight_is_not_kept(
    served: Served,
) -> None:
    resolver = served.resolver()
    path = (2, 1, 0)
    nodes = nodes_of(path)
    prefetch = asyncio.create_task(resolver.prefetch(path))
    await asyncio.sleep(0)  # past its blocklist check, reads started (see the resolve case)
    assert not prefetch.done()
    served.blocklist.block(2, nodes[1])
    reports = await prefetch
    assert reports[1:] == [Degraded(2, "blocked", "none"), Degraded(3, "blocked", "none")]
    assert resolver.residency() == {1: [nodes[0]], 2: [], 3: []}


async def test_prefetch_refuses_a_bad_path(served: Served) -> None:
    with pytest.raises(MemoryRequestError) as caught:
        await served.resolver().prefetch((0, 0))
    assert caught.value.param == "memory.path"
