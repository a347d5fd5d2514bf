"""Fixtures for the HTTP API: settings for the demo bank and for a three-tier bank, and a live
uvicorn server on a loopback port (for clients that need real HTTP: the openai client,
disconnects)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.bank import Bank, write_random_bank
from server.bank.layout import ModelShape
from server.bank.push import push_bank
from server.defaults import DEMO_BANK
from server.settings import Settings, load_settings
from tests.conftest import S3_CREDENTIALS, S3Server
from tests.server.api.live import live
from tiers import StoreConfig, open_tier

# The demo anchor's shape: a random bank with this shape can use the demo bank's anchor.
DEMO_SHAPE = ModelShape(
    n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=192
)


@pytest.fixture
def demo_settings(tmp_path: Path) -> Settings:
    """The demo bank on the embedded default tiers (LMDB + disk) under a private data dir."""
    return load_settings(data_dir=tmp_path / "state", warmup=False)


def write_three_level_bank(out: Path) -> Bank:
    """A 3-level random bank (4 / 16 / 64 clusters) on the demo bank's trained anchor."""
    write_random_bank(
        out,
        bank_id="three",
        levels=3,
        branching=4,
        widths=(16, 8, 8),
        model=DEMO_SHAPE,
        anchor_dir=DEMO_BANK / "anchor",
        embedder={"kind": "hashed-tfidf", "dim": 256, "ngram_max": 2, "seed": 0},
    )
    return Bank.open(out)


def three_tier_store(tmp_path: Path, s3: S3Server, bucket: str, **extra: Any) -> StoreConfig:
    """Level 1 on LMDB, level 2 on disk, level 3 on S3 (the moto server over loopback)."""
    return StoreConfig.model_validate(
        {
            "tiers": {
                "flash": {"kind": "lmdb", "path": tmp_path / "flash.lmdb"},
                "disk": {"kind": "disk", "root": tmp_path / "disk", "fsync": False},
                "cloud": {
                    "kind": "s3",
                    "bucket": bucket,
                    "prefix": "banks",
                    "endpoint_url": s3.endpoint_url,
                    "region": "us-east-1",
                    "access_key_id": S3_CREDENTIALS["access_key_id"],
                    "secret_access_key": S3_CREDENTIALS["secret_access_key"],
                    "connect_timeout_s": 0.5,
                    "read_timeout_s": 1.0,
                    "max_attempts": 1,
                },
            },
            "placement": {1: "flash", 2: "disk", 3: "cloud"},
            **extra,
        }
    )


async def push(bank: Bank, config: StoreConfig) -> None:
    tiers = {name: open_tier(name, t) for name, t in config.tiers.items()}
    try:
        cloud = tiers["cloud"]
        create = getattr(cloud, "create_bucket", None)
        if create is not None:
            await create()
        await push_bank(bank, tiers, config.placement, progress=False)
    finally:
        for tier in tiers.values():
            await tier.aclose()


@pytest.fixture
def three_tier_settings(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> Iterator[Settings]:
    """A 3-level bank pushed to LMDB, disk and S3, served with a short memory deadline."""
    bank = write_three_level_bank(tmp_path / "bank")
    store = three_tier_store(
        tmp_path, s3_server, s3_bucket, deadline_s=1.0, breaker_failures=2, breaker_reset_s=30.0
    )
    asyncio.run(push(bank, store))
    return load_settings(
        bank=bank.path,
        data_dir=tmp_path / "state",
        store=store,
        warmup=False,
        admin_key="admin-secret-key",
    )


@pytest.fixture
def live_server() -> Iterator[Any]:
    """A factory: `live_server(settings)` serves create_app(settings) on 127.0.0.1 (`live.py`)."""
    with contextlib.ExitStack() as servers:
        yield lambda settings: servers.enter_context(live(settings))
