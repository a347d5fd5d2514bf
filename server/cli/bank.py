"""The `hmem bank` commands: `push` copies a bank's blocks to their tiers, `verify` checks them,
`generate` writes a bank of a given shape with random weights straight into its tiers, `convert`
writes a bank's blocks in another dtype as a new bank.

    hmem bank push BANK --tier 1=lmdb:/data/flash --tier 2=/data/disk --tier 3=s3://b/p \\
        [--endpoint-url URL] [--region R] [--create-bucket] [--concurrency N] [--no-progress] \\
        [--trust-existing] [--prune]
    hmem bank push BANK --config hmem.toml        # the placement of the settings' [store]
    hmem bank push BANK --dtype int8 --out OUT (tier flags)   # convert, then push OUT
    hmem bank verify BANK (same tier flags) [--repair]
    hmem bank generate OUT [--shape paper-160m] --tier 1=lmdb:/data/flash \\
        --tier 2=/data/disk --tier 3=/data/disk --tier 4=s3://hmem/scale \\
        [--endpoint-url URL] [--region R] [--seed 0] [--bank-id ID] [--concurrency 8] \\
        [--dtype {bfloat16,float16,float32,int8}]
    hmem bank convert SRC OUT --dtype int8 [--overwrite] [--concurrency 4] [--no-progress]

`push` writes what is missing or corrupt: copies already there are read back and checked against
the manifest's sha256 (`--trust-existing` takes their name and size instead, for huge banks).
`verify --repair` rewrites every missing or corrupt copy from the bank directory. Both list stale
copies (this bank's names that no block of this build has); `push --prune` deletes them.
`generate` prints the shape's sizes first, then a progress bar (on a terminal), then what was
written and how to serve the result (`server.bank.generate`, docs/scale.md). `convert` writes a
new bank (same id, tree, router, anchor; new block bytes and sha256s: `server.bank.convert`),
pushed with `hmem bank push OUT` as any bank; `push --dtype D --out OUT` does both.

Exit codes: 0 done, 1 verify found missing or corrupt blocks (and did not repair them all), 2 an
error (one line on stderr, `hmem: error: ...`), 130 interrupted (a push or a generation resumes
where it stopped when run again; an interrupted conversion left nothing and starts over).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from server.bank.convert import ConvertReport, convert_bank
from server.bank.errors import BankError
from server.bank.generate import SERVE_SETTINGS, generate_bank
from server.bank.layout import BANK_DTYPES
from server.bank.placement import check_placement, placement_from_flags, tier_location
from server.bank.push import PushReport, VerifyReport, push_bank, verify_bank
from server.bank.reader import Bank
from server.bank.shapes import SHAPES
from server.defaults import bank_dir, store_config
from server.settings import load_settings
from tiers.base import Tier
from tiers.config import StoreConfig, open_tier
from tiers.errors import ConfigError
from tiers.s3 import S3Tier

SHOWN_KEYS = 5  # problem keys listed per tier and kind; the rest are counted
# What `hmem` adds to "interrupted": a push or a generation picks up where it stopped.
RESUMES = "; run the same command again to resume"
CONVERT_STARTS_OVER = "; OUT was not written: run the same command again"
GENERATE_EXAMPLE = (
    "--tier 1=lmdb:DIR/flash --tier 2=DIR/disk --tier 3=DIR/disk --tier 4=s3://hmem/scale "
    "--endpoint-url http://127.0.0.1:9000"
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `bank push`, `verify`, `generate` and `convert` to the `hmem` subcommands."""
    bank = commands.add_parser(
        "bank", help="copy a bank's blocks to their tiers, check, generate or convert banks"
    )
    bank_commands = bank.add_subparsers(dest="bank_command", required=True)

    push = bank_commands.add_parser(
        "push",
        help="copy every block to its level's tiers (writes what is missing or corrupt)",
        description="Copy every block of BANK to the tiers its level is placed on. Resumable: "
        "copies already in a tier are read back and kept when their sha256 matches the "
        "manifest; missing ones are written and corrupt ones rewritten.",
    )
    _add_common(push)
    push.add_argument(
        "--create-bucket",
        action="store_true",
        help="create the S3 buckets of the placement first if they do not exist",
    )
    push.add_argument(
        "--trust-existing",
        action="store_true",
        help="keep copies already there with the right name and size without reading them "
        "back (for banks too large to re-read; a corrupt copy of the right size stays)",
    )
    push.add_argument(
        "--prune",
        action="store_true",
        help="delete this bank's stale copies: other builds' and unsuffixed names",
    )
    push.add_argument(
        "--dtype",
        choices=BANK_DTYPES,
        help="convert BANK to this dtype first (as `hmem bank convert BANK OUT`), then push the "
        "converted bank; needs --out",
    )
    push.add_argument(
        "--out", type=Path, metavar="OUT", help="where --dtype writes the converted bank"
    )
    push.set_defaults(run=_push_run, on_interrupt=RESUMES)

    verify = bank_commands.add_parser(
        "verify",
        help="check that every block is in its tiers with the manifest's size and sha256",
    )
    _add_common(verify)
    verify.add_argument(
        "--repair",
        action="store_true",
        help="rewrite every missing or corrupt copy from the bank directory",
    )
    verify.set_defaults(run=_on_a_loop(_verify), on_interrupt=RESUMES)
    _add_generate(bank_commands)
    _add_convert(bank_commands)


def _add_convert(bank_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    convert = bank_commands.add_parser(
        "convert",
        help="write a bank's blocks in another dtype (int8: half the bytes) as a new bank",
        description="Write the bank SRC with its blocks and generic memories stored in --dtype "
        "as a new bank OUT: the same bank id, tree, router, anchor and tokenizer; new block "
        "bytes and sha256s. int8 (FFN banks only) stores int8 weights with a float32 scale per "
        "memory neuron: about half the bytes of bf16, within half a scale step of each value. "
        "OUT appears whole or not at all; the same command over a finished conversion does "
        "nothing. Then push it as any bank: hmem bank push OUT --tier ... (its copies have new "
        "names; --prune deletes the old dtype's copies from those tiers).",
    )
    convert.add_argument("src", type=Path, metavar="SRC", help="the bank directory to convert")
    convert.add_argument("out", type=Path, metavar="OUT", help="the new bank directory")
    convert.add_argument(
        "--dtype", choices=BANK_DTYPES, required=True, help="the converted blocks' dtype"
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace a bank at OUT that is another one"
    )
    convert.add_argument(
        "--concurrency",
        type=_positive,
        default=4,
        metavar="N",
        help="blocks converted at once (default 4)",
    )
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(run=_convert, on_interrupt=CONVERT_STARTS_OVER)


def _add_generate(bank_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = bank_commands.add_parser(
        "generate",
        help="write a bank of random weights of a given shape, each level into its tier",
        description="Write a bank of SHAPE with random weights (for measuring speed and memory): "
        "the anchor, tokenizer, router and manifest into OUT, every block straight into the "
        "tiers of its level (the disk holds one copy). Resumable: run the same command again "
        f"after an interruption. Paper placement: {GENERATE_EXAMPLE}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("out", metavar="OUT", help="the bank directory to write")
    gen.add_argument("--shape", choices=sorted(SHAPES), default="paper-160m", help="bank shape")
    gen.add_argument(
        "--tier",
        action="append",
        default=[],
        metavar="LEVEL=URI",
        help="where a level lives: lmdb:PATH, a directory, or s3://bucket/prefix; one per level",
    )
    gen.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for s3:// tiers")
    gen.add_argument("--region", metavar="REGION", help="S3 region for s3:// tiers")
    gen.add_argument("--seed", type=int, default=0, help="random seed of every weight")
    gen.add_argument(
        "--dtype",
        choices=BANK_DTYPES,
        help="the blocks' dtype (default: the shape's, bfloat16); int8: the bf16 weights "
        "quantized, int8 with a float32 scale per neuron. The anchor keeps the shape's dtype",
    )
    gen.add_argument("--bank-id", metavar="ID", help="bank id (default: the shape's name)")
    gen.add_argument(
        "--concurrency", type=_positive, default=8, metavar="N", help="blocks in flight"
    )
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(run=_on_a_loop(_generate), on_interrupt=RESUMES)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bank",
        type=Path,
        metavar="BANK",
        nargs="?",
        help="bank directory (default: the served bank of the settings, else the demo bank)",
    )
    parser.add_argument(
        "--tier",
        action="append",
        default=[],
        metavar="LEVEL=URI",
        help="where a level lives: lmdb:PATH, a directory, or s3://bucket/prefix; repeat per "
        "level (a level given twice gets a replica; one URI for several levels is one tier)",
    )
    parser.add_argument(
        "--endpoint-url", metavar="URL", help="S3-compatible endpoint for s3:// tiers"
    )
    parser.add_argument("--region", metavar="REGION", help="S3 region for s3:// tiers")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="SETTINGS",
        help="settings file (TOML or JSON) whose [store] gives the tiers and placement, "
        "instead of --tier",
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=8, metavar="N", help="blocks in flight (default 8)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _on_a_loop(
    body: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    """`body` as a command's `run`: on a fresh event loop, its exit status returned."""

    def run(args: argparse.Namespace) -> int:
        return asyncio.run(body(args))

    return run


def _bank_dir(args: argparse.Namespace) -> Path:
    if args.bank is not None:
        return Path(args.bank)
    return bank_dir(load_settings(args.config))


def _store_config(args: argparse.Namespace, bank: Bank) -> StoreConfig:
    if args.tier:
        if args.config is not None:
            raise ConfigError("give the placement as --tier flags or --config, not both")
        return placement_from_flags(
            args.tier,
            bank_id=bank.manifest.bank_id,
            levels=bank.manifest.levels,
            endpoint_url=args.endpoint_url,
            region=args.region,
        )
    if args.endpoint_url is not None or args.region is not None:
        raise ConfigError("--endpoint-url and --region apply to --tier s3:// URIs only")
    # The settings' [store], else the embedded default `hmem serve` uses (HMEM_* environment).
    config, _ = store_config(load_settings(args.config), bank.manifest)
    return config


@contextlib.asynccontextmanager
async def _placed_tiers(config: StoreConfig) -> AsyncIterator[dict[str, Tier]]:
    """The placement's tiers (homes and replicas), bare (no profile, no cap), closed on exit."""
    names = dict.fromkeys(n for level in sorted(config.placement) for n in config.placement[level])
    tiers: dict[str, Tier] = {}
    try:
        for name in names:
            tiers[name] = open_tier(name, config.tiers[name])
        yield tiers
    finally:
        for tier in tiers.values():
            await tier.aclose()


def _levels_of(config: StoreConfig) -> dict[str, str]:
    levels: dict[str, list[int]] = {}
    for level, names in sorted(config.placement.items()):
        for name in names:
            levels.setdefault(name, []).append(level)
    return {name: ",".join(map(str, ls)) for name, ls in levels.items()}


def _push_run(args: argparse.Namespace) -> int:
    """`push`, after converting BANK into OUT when --dtype is given (synchronously: Ctrl-C stops
    the conversion at once, leaving nothing)."""
    if args.dtype is None:
        if args.out is not None:
            raise ConfigError("--out names where --dtype writes the converted bank: give both")
    elif args.out is None:
        raise ConfigError(
            "--dtype needs --out OUT: a converted bank is a new bank directory, which is pushed"
        )
    else:
        src = _bank_dir(args)
        report = convert_bank(
            src,
            args.out,
            dtype=args.dtype,
            concurrency=args.concurrency,
            progress=not args.no_progress,
        )
        _print_convert(src, args.out, args.dtype, report)
        args.bank = args.out
    return asyncio.run(_push(args))


def _convert(args: argparse.Namespace) -> int:
    report = convert_bank(
        args.src,
        args.out,
        dtype=args.dtype,
        concurrency=args.concurrency,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    _print_convert(args.src, args.out, args.dtype, report)
    if not report.complete:
        print(f"push it: hmem bank push {args.out} --tier LEVEL=URI ... (or --config SETTINGS)")
    return 0


def _print_convert(src: Path, out: Path, dtype: str, report: ConvertReport) -> None:
    if report.complete:
        print(f"{out}: already holds this build of {src} converted to {dtype}; nothing to do")
        return
    ratio = report.bytes_written / report.source_bytes if report.source_bytes else 0.0
    print(
        f"converted {report.blocks} blocks of {src} to {dtype} in {out}: "
        f"{report.source_bytes / 2**20:.2f} MiB -> {report.bytes_written / 2**20:.2f} MiB "
        f"({ratio:.3f}x) in {report.seconds:.1f} s"
    )


async def _push(args: argparse.Namespace) -> int:
    bank = Bank.open(_bank_dir(args), require_anchor=False)
    config = _store_config(args, bank)
    check_placement(bank.manifest, config.placement, config.tiers.keys())
    async with _placed_tiers(config) as tiers:
        if args.create_bucket:
            for tier in tiers.values():
                if isinstance(tier, S3Tier) and await tier.create_bucket():
                    print(f"created S3 bucket {tier.bucket!r} for tier {tier.name!r}")
        report = await push_bank(
            bank,
            tiers,
            config.placement,
            concurrency=args.concurrency,
            progress=not args.no_progress,
            trust_existing=args.trust_existing,
            prune=args.prune,
        )
    _print_push(bank, config, report, pruned=args.prune)
    return 0


def _print_push(bank: Bank, config: StoreConfig, report: PushReport, *, pruned: bool) -> None:
    levels = _levels_of(config)
    columns = ("written", "checked", "trusted", "repaired", "stale")
    print(
        f"{'tier':<10} {'levels':<8} " + " ".join(f"{c:>8}" for c in columns) + "       MiB  where"
    )
    for name, t in report.tiers.items():
        counts = (t.written, t.checked, t.trusted, t.repaired, len(t.stale))
        cells = " ".join(f"{n:>8}" for n in counts)
        mib = t.bytes_written / 2**20
        print(
            f"{name:<10} {levels[name]:<8} {cells} {mib:>9.2f}  {tier_location(config.tiers[name])}"
        )
    total = report.total
    kept = f"{total.checked} checked good (sha256)"
    if total.trusted:
        kept += f", {total.trusted} kept on name and size (--trust-existing)"
    print(
        f"bank {bank.manifest.bank_id!r}: {total.written} blocks written, {total.repaired} "
        f"repaired ({total.bytes_written / 2**20:.2f} MiB), {kept}, in {report.seconds:.1f} s"
    )
    if total.stale and pruned:
        print(f"  deleted {total.pruned} stale copies (other builds' and unsuffixed names)")
    elif total.stale:
        print(
            f"  {len(total.stale)} stale copies (other builds' and unsuffixed names), "
            f"e.g. {total.stale[0]}: --prune deletes them"
        )


async def _verify(args: argparse.Namespace) -> int:
    bank = Bank.open(_bank_dir(args), require_anchor=False, check_files=False)
    config = _store_config(args, bank)
    check_placement(bank.manifest, config.placement, config.tiers.keys())
    async with _placed_tiers(config) as tiers:
        report = await verify_bank(
            bank,
            tiers,
            config.placement,
            concurrency=args.concurrency,
            progress=not args.no_progress,
            repair=args.repair,
        )
    defaulted = not args.tier and args.config is None
    if defaulted and not args.repair and _nothing_pushed(report):
        # `hmem bank verify BANK` right after `hmem build`: no tier holds a copy yet, which is
        # not a fault of the bank. Say what does verify, and what has not been done.
        return await _verify_directory_only(bank, config)
    _print_verify(bank, config, report)
    return 0 if report.ok else 1


def _nothing_pushed(report: VerifyReport) -> bool:
    return all(t.ok == 0 and not t.corrupt for t in report.tiers.values())


async def _verify_directory_only(bank: Bank, config: StoreConfig) -> int:
    blocks = len(bank.block_keys())
    try:
        await asyncio.get_running_loop().run_in_executor(None, bank.verify)
    except BankError as exc:
        print(f"bank {bank.manifest.bank_id!r}: the bank directory does not verify: {exc}")
        return 1
    where = ", ".join(sorted({tier_location(t) for t in config.tiers.values()}))
    print(
        f"bank {bank.manifest.bank_id!r}: the bank directory verifies ({blocks} blocks, every "
        f"digest matches); no copies are pushed to the default tiers ({where}): `hmem bank push "
        f"{bank.path}` writes them (`hmem serve` does at start), or give --tier to check others"
    )
    return 0


def _print_verify(bank: Bank, config: StoreConfig, report: VerifyReport) -> None:
    levels = _levels_of(config)
    columns = ("missing", "corrupt", "repaired", "stale")
    print(
        f"{'tier':<10} {'levels':<8} {'ok':>6} " + " ".join(f"{c:>8}" for c in columns) + "  where"
    )
    for name, t in report.tiers.items():
        counts = (len(t.missing), len(t.corrupt), len(t.repaired), len(t.stale))
        cells = " ".join(f"{n:>8}" for n in counts)
        print(
            f"{name:<10} {levels[name]:<8} {t.ok:>6} {cells}  {tier_location(config.tiers[name])}"
        )
    for name, t in report.tiers.items():
        fixed = set(t.repaired)
        problems: list[tuple[str, str, str | None]] = [(key, "missing", None) for key in t.missing]
        problems += [(key, "corrupt", why) for key, why in t.corrupt.items()]
        for key, what, why in problems[:SHOWN_KEYS]:
            detail = f" ({why})" if why else ""
            print(f"  {name}: {what} {key}{detail}{': repaired' if key in fixed else ''}")
        if len(problems) > SHOWN_KEYS:
            print(f"  {name}: ... and {len(problems) - SHOWN_KEYS} more missing or corrupt")
        if t.stale:
            print(f"  {name}: {len(t.stale)} stale copies, e.g. {t.stale[0]} (push --prune)")
    verdict = "ok" if report.ok else "FAILED"
    if report.repaired:
        verdict += f", {report.repaired} copies repaired from the bank directory"
    print(f"bank {bank.manifest.bank_id!r}: verify {verdict} in {report.seconds:.1f} s")


async def _generate(args: argparse.Namespace) -> int:
    shape = SHAPES[args.shape]
    if args.dtype is not None:
        shape = shape.with_dtype(args.dtype)
    bank_id = args.bank_id or shape.name
    config = placement_from_flags(
        args.tier,
        bank_id=bank_id,
        levels=shape.levels,
        endpoint_url=args.endpoint_url,
        region=args.region,
    )
    print(shape.summary())
    for level, names in sorted(config.placement.items()):
        print(f"  L{level} -> " + ", ".join(tier_location(config.tiers[n]) for n in names))
    report = await generate_bank(
        args.out,
        shape,
        config,
        bank_id=bank_id,
        seed=args.seed,
        concurrency=args.concurrency,
        progress=not args.no_progress,
    )
    if report.complete:
        print(f"{args.out}: already complete (manifest.json written); nothing to do")
        return 0
    written = sum(report.written.values())
    rate = report.bytes_written / report.seconds / 1e6 if report.seconds else 0.0
    print(
        f"wrote {written} blocks ({report.bytes_written / 1e9:.2f} GB) in {report.seconds:.0f} s "
        f"({rate:.0f} MB/s); {report.resumed} were already written"
    )
    print(f"serve it: hmem serve --config {args.out}/{SERVE_SETTINGS}")
    return 0
