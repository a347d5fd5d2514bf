"""Fixtures for push and verify tests: a three-level bank, and its tiers (LMDB, disk, S3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.bank import Bank, write_random_bank
from tests.conftest import S3_CREDENTIALS, S3Server
from tests.server.bank.placement import Placed, tier_flags
from tiers import S3Tier


@pytest.fixture
def bank(tmp_path: Path) -> Bank:
    """Levels 1..3 of branching 2: 2 + 4 + 8 blocks."""
    write_random_bank(tmp_path / "bank", levels=3, branching=2, widths=(8, 4, 2))
    return Bank.open(tmp_path / "bank", require_anchor=False)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials from the environment, as boto3 reads them; no profile files."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CREDENTIALS["secret_access_key"])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
async def placed(
    bank: Bank, tmp_path: Path, s3_server: S3Server, s3_bucket: str, aws_env: None
) -> AsyncIterator[Placed]:
    """Level 1 on LMDB, level 2 on a directory, level 3 on S3 (bucket created)."""
    p = Placed(bank, tier_flags(tmp_path, s3_bucket), s3_server)
    cloud = p.tiers["cloud"]
    assert isinstance(cloud, S3Tier)
    assert await cloud.create_bucket()
    yield p
    await p.aclose()
