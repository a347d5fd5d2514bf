"""Tier fixtures: every tier kind, opened on real storage in a temporary place."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import S3_CREDENTIALS, S3Server
from tiers import DiskTier, LmdbTier, S3Tier, Tier


async def open_s3(server: S3Server, bucket: str, **kwargs: object) -> S3Tier:
    tier = S3Tier(
        bucket,
        endpoint_url=server.endpoint_url,
        region="us-east-1",
        **S3_CREDENTIALS,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
    await tier.create_bucket()
    return tier


@pytest.fixture(params=["lmdb", "disk", "s3"])
async def tier(
    request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> AsyncIterator[Tier]:
    t: Tier
    if request.param == "lmdb":
        t = LmdbTier(tmp_path / "flash", map_size=1 << 30)
    elif request.param == "disk":
        t = DiskTier(tmp_path / "disk")
    else:
        t = await open_s3(s3_server, s3_bucket)
    yield t
    await t.aclose()


def blob(n: int, seed: int = 0) -> bytes:
    """`n` reproducible pseudo-random bytes, different for each seed."""
    return random.Random(seed).randbytes(n)
