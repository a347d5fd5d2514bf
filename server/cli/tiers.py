"""`hmem tiers profiles` lists the device profiles a tier can emulate; `hmem tiers check` opens
every configured tier and reports, per tier, whether it answers and what it holds (exit status 1
when one does not)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tiers profiles` and `tiers check` to the `hmem` subcommands."""
    tiers = commands.add_parser("tiers", help="inspect the storage hierarchy")
    tier_commands = tiers.add_subparsers(dest="tiers_command", required=True)
    profiles = tier_commands.add_parser("profiles", help="list device profiles")
    profiles.add_argument("--profiles", type=Path, help="TOML or JSON file of extra profiles")
    profiles.set_defaults(run=_profiles)
    check = tier_commands.add_parser("check", help="open every configured tier and report it")
    check.add_argument("--config", type=Path, help="settings file (TOML or JSON)")
    check.set_defaults(run=_check)


def _profiles(args: argparse.Namespace) -> int:
    from tiers import load_profiles

    profiles = load_profiles(args.profiles)
    print(f"{'profile':<20} {'latency':>10} {'bandwidth':>12}  source")
    for p in profiles.values():
        bw = f"{p.bandwidth_bytes_s / 1e6:,.0f} MB/s"
        print(f"{p.name:<20} {p.latency_s * 1e3:>7.2f} ms {bw:>12}  {p.source}")
    return 0


def _check(args: argparse.Namespace) -> int:
    return asyncio.run(_check_store(args.config))


async def _check_store(config_file: Path | None) -> int:
    from server.settings import load_settings
    from tiers import BytesCodec, ConfigError, TierError, build_store

    settings = load_settings(config_file)
    if settings.store is None:
        raise ConfigError(
            "no store configured: set [store] in the settings file or HMEM_STORE__* variables"
        )
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
