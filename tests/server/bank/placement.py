"""Helpers for push and verify tests: a flags placement's tiers opened, and the `hmem bank` CLI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.bank import Bank
from server.bank.placement import placement_from_flags
from server.cli import main
from tests.conftest import S3Server
from tiers import Tier, open_tier


def tier_flags(tmp_path: Path, bucket: str) -> list[str]:
    return [f"1=lmdb:{tmp_path / 'flash'}", f"2={tmp_path / 'disk'}", f"3=s3://{bucket}/banks"]


class Placed:
    """The tiers of a flags placement, opened."""

    def __init__(self, bank: Bank, flags: Sequence[str], s3_server: S3Server) -> None:
        self.config = placement_from_flags(
            flags,
            bank_id=bank.manifest.bank_id,
            levels=bank.manifest.levels,
            endpoint_url=s3_server.endpoint_url,
            region="us-east-1",
        )
        self.placement = self.config.placement
        self.tiers: dict[str, Tier] = {
            name: open_tier(name, settings) for name, settings in self.config.tiers.items()
        }

    def home(self, level: int) -> Tier:
        return self.tiers[self.placement[level][0]]

    async def aclose(self) -> None:
        for tier in self.tiers.values():
            await tier.aclose()


def run_cli(argv: list[str]) -> int:
    """`hmem ARGV` in this process; the exit code."""
    return main(argv)
