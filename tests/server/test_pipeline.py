"""A prompt's whole path: route with the bank's router, fetch its blocks through real tiers,
batch them, and run the anchor. What reaches `forward` must be exactly the bank's blocks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from server.bank import Bank, write_random_bank
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor, save_anchor
from server.model.memory import MemoryBlock, MemoryType
from server.model.memory_batch import build_memory_batch
from server.routing import Router
from tests.server.model.conftest import anchor
from tiers import BlockKey, StoreConfig, TieredStore, build_store

PROMPTS = ["The atomic number of iron is", "Einsteinium was first found in debris", "hello"]


async def open_bank(tmp_path: Path, kind: MemoryType, *, zero: bool = False) -> Bank:
    save_anchor(anchor(), tmp_path / "anchor-src")
    write_random_bank(
        tmp_path / "bank",
        memory_type=kind,
        levels=2,
        branching=4,
        widths=(8, 4),
        lora_targets=["q", "v", "down"] if kind is MemoryType.LORA else None,
        anchor_dir=tmp_path / "anchor-src",
        zero_down=zero,
        seed=3,
    )
    return Bank.open(tmp_path / "bank")


async def pushed_store(bank: Bank, tmp_path: Path) -> TieredStore[MemoryBlock]:
    cfg = StoreConfig.model_validate(
        {
            "tiers": {
                "flash": {"kind": "lmdb", "path": tmp_path / "flash", "map_size": "64MiB"},
                "disk": {"kind": "disk", "root": tmp_path / "disk"},
            },
            "placement": {1: "flash", 2: "disk"},
            "ram_cache": "16MiB",
        }
    )
    store = await build_store(cfg, codec=bank.codec(), digests=bank.manifest.digests())
    for key in bank.block_keys():
        home = store.tiers[store.placement[key.level][0]]
        await home.put(store.storage_name(key), bank.block_bytes(key))
    return store


@pytest.fixture(params=list(MemoryType))
async def setup(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Bank, TieredStore[MemoryBlock], Router, Anchor]]:
    bank = await open_bank(tmp_path, request.param)
    store = await pushed_store(bank, tmp_path)
    m = bank.manifest
    router = Router.load(
        bank.path / "router.safetensors", m.embedder, branching=m.branching, levels=m.levels
    )
    yield bank, store, router, load_anchor(bank.anchor_dir)
    await store.aclose()


async def test_fetched_path_blocks_drive_forward_exactly_as_the_banks_own(
    setup: tuple[Bank, TieredStore[MemoryBlock], Router, Anchor],
) -> None:
    bank, store, router, model = setup
    route = router.route_texts(PROMPTS)
    keys = [
        [BlockKey(bank.manifest.bank_id, lvl + 1, int(n)) for lvl, n in enumerate(row)]
        for row in route.node_ids
    ]
    fetched = [await store.fetch_many(path) for path in keys]
    assert all(f.ok for path in fetched for f in path)
    assert {f.tier for f in fetched[0]} == {"flash", "disk"}
    served = [[f.value for f in path if f.value is not None] for path in fetched]
    direct = [[bank.read_block(k) for k in path] for path in keys]

    tokens = torch.tensor([[1, 5, 17, 3, 88, 42], [4, 4, 8, 15, 16, 0], [9, 9, 0, 0, 0, 0]])
    with torch.no_grad():
        via_tiers = model(tokens, memory=build_memory_batch(served, dtype=torch.float32))
        via_bank = model(tokens, memory=build_memory_batch(direct, dtype=torch.float32))
        without = model(tokens)
    torch.testing.assert_close(via_tiers, via_bank, rtol=0, atol=0)
    assert not torch.allclose(via_tiers, without, atol=1e-4)
    again = await store.fetch_many(keys[0])
    assert all(f.cached and f.tier == "ram" for f in again)


async def test_a_freshly_initialised_bank_changes_nothing(tmp_path: Path) -> None:
    bank = await open_bank(tmp_path, MemoryType.FFN, zero=True)
    store = await pushed_store(bank, tmp_path)
    try:
        model = load_anchor(bank.anchor_dir)
        path = [BlockKey(bank.manifest.bank_id, 1, 2), BlockKey(bank.manifest.bank_id, 2, 9)]
        blocks = [f.value for f in await store.fetch_many(path) if f.value is not None]
        generic = [g for lvl in (1, 2) if (g := bank.generic(lvl)) is not None]
        tokens = torch.tensor([[1, 5, 17, 3, 88, 42]])
        with torch.no_grad():
            base = model(tokens)
            for mem in (blocks, generic):
                out = model(tokens, memory=build_memory_batch([mem], dtype=torch.float32))
                torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
    finally:
        await store.aclose()
