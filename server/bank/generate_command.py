"""`hmem bank generate`: the command line of `server.bank.generate`.

    hmem bank generate OUT [--shape paper-160m] --tier 1=lmdb:/data/flash \\
        --tier 2=/data/disk --tier 3=/data/disk --tier 4=s3://hmem/scale \\
        [--endpoint-url URL] [--region R] [--seed 0] [--bank-id ID] [--concurrency 8]

Prints the shape's sizes first, then a progress bar (on a terminal), then what was written and
how to serve the result. Exit codes as `hmem bank push`: 0 done, 2 an error, 130 interrupted
(run the same command again to resume).
"""

from __future__ import annotations

import argparse

from server.bank.generate import SERVE_SETTINGS, generate_bank
from server.bank.placement import placement_from_flags, tier_location
from server.bank.shapes import SHAPES

EXAMPLE = (
    "--tier 1=lmdb:DIR/flash --tier 2=DIR/disk --tier 3=DIR/disk --tier 4=s3://hmem/scale "
    "--endpoint-url http://127.0.0.1:9000"
)


def register(bank_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `bank generate` to the `hmem bank` subcommands."""
    # Imported here: `commands` imports this module for `register`, and `_command` lives there.
    from server.bank.commands import _command, _positive

    gen = bank_commands.add_parser(
        "generate",
        help="write a bank of random weights of a given shape, each level into its tier",
        description="Write a bank of SHAPE with random weights (for measuring speed and memory): "
        "the anchor, tokenizer, router and manifest into OUT, every block straight into the "
        "tiers of its level (the disk holds one copy). Resumable: run the same command again "
        f"after an interruption. Paper placement: {EXAMPLE}",
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
    gen.add_argument("--bank-id", metavar="ID", help="bank id (default: the shape's name)")
    gen.add_argument(
        "--concurrency", type=_positive, default=8, metavar="N", help="blocks in flight"
    )
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(run=_command(_generate))


async def _generate(args: argparse.Namespace) -> int:
    shape = SHAPES[args.shape]
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
