"""The `hmem` command line.

`hmem serve` serves a bank over HTTP (with no arguments, the demo bank). `hmem build` trains a
memory bank from a corpus; `hmem bank push` copies its blocks to their
tiers and `hmem bank verify` checks them there. `hmem synth` writes a synthetic long-tail
corpus and `hmem eval` measures a bank's accuracy on it by frequency bucket.
`hmem tiers profiles` lists the device profiles a tier can emulate; `hmem tiers check` opens
the configured storage hierarchy and reports, per tier, whether it answers and what it holds.
Errors a user can fix are printed as one line, `hmem: error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server import __version__
from server.bank.commands import register as register_bank
from server.bank.errors import BankError
from server.model.errors import ModelError
from server.routing.errors import RouterError
from server.serve import register as register_serve
from server.settings import load_settings
from tiers import BytesCodec, TierError, build_store, load_profiles

# Errors that describe something the user can fix: reported in one line, never as a traceback.
# A command may add its own as the `user_errors` default of its parser.
USER_ERRORS = (TierError, ModelError, BankError, RouterError)

# The training commands (`server.training.commands`) are registered in full only when one of
# them runs: `hmem serve` and the other serving commands never import the training package.
TRAINING_COMMANDS = {
    "build": "train a memory bank from a corpus",
    "synth": "write a synthetic long-tail knowledge corpus (corpus.jsonl, facts.jsonl)",
    "eval": "long-tail accuracy by frequency bucket, with memory and without",
    "demo": "build the demo bank from the synthetic corpus (fixed seeds) and evaluate it",
}


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `hmem` parser; the training commands in full only when `command` is one of them."""
    parser = argparse.ArgumentParser(
        prog="hmem", description="Tiered memory-serving inference server."
    )
    parser.add_argument("--version", action="version", version=f"hmem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    if command in TRAINING_COMMANDS:
        from server.training.commands import register as register_training

        register_training(commands, TRAINING_COMMANDS)
    else:
        for name, help_text in TRAINING_COMMANDS.items():
            commands.add_parser(name, help=help_text)  # listed in `hmem --help`, never run
    register_bank(commands)
    register_serve(commands)

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
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top level takes no option with a value, so the first word is the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args))
    except (*USER_ERRORS, *getattr(args, "user_errors", ())) as exc:
        print(f"hmem: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`hmem eval | head`): stop quietly, as other CLI tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
