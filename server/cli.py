"""The `hmem` command line.

`hmem tiers profiles` lists the device profiles a tier can emulate; `hmem tiers check` opens
the configured storage hierarchy and reports, per tier, whether it answers and what it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from server import __version__
from server.settings import load_settings
from tiers import BytesCodec, TierError, build_store, load_profiles


def _profiles(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.profiles)
    print(f"{'profile':<20} {'latency':>10} {'bandwidth':>12}  source")
    for p in profiles.values():
        bw = f"{p.bandwidth_bytes_s / 1e6:,.0f} MB/s"
        print(f"{p.name:<20} {p.latency_s * 1e3:>7.2f} ms {bw:>12}  {p.source}")
    return 0


async def _check_store(config_file: Path | None) -> int:
    settings = load_settings(config_file)
    if settings.store is None:
        print("no store configured: set [store] in the settings file or HMEM_STORE__* variables")
        return 2
    store = await build_store(settings.store, codec=BytesCodec(), digests=None)
    failed = 0
    try:
        for name, tier in store.tiers.items():
            try:
                listing = await asyncio.wait_for(tier.scan(), timeout=store.policy.deadline_s * 5)
            except (TierError, TimeoutError) as exc:
                failed += 1
                print(f"{name:<12} DOWN  {exc}")
                continue
            total = sum(size for _, size in listing)
            print(f"{name:<12} ok    {len(listing)} blocks, {total / 2**20:,.1f} MiB")
    finally:
        await store.aclose()
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmem", description="Tiered memory-serving inference server."
    )
    parser.add_argument("--version", action="version", version=f"hmem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    tiers = commands.add_parser("tiers", help="inspect the storage hierarchy")
    tier_commands = tiers.add_subparsers(dest="tiers_command", required=True)
    profiles = tier_commands.add_parser("profiles", help="list device profiles")
    profiles.add_argument("--profiles", type=Path, help="TOML or JSON file of extra profiles")
    profiles.set_defaults(run=_profiles)
    check = tier_commands.add_parser("check", help="open every configured tier and report it")
    check.add_argument("--config", type=Path, help="settings file (TOML or JSON)")
    check.set_defaults(run=lambda a: asyncio.run(_check_store(a.config)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except TierError as exc:
        print(f"hmem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
