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
from server.build.corpus import CorpusError
from server.build.demo import build_demo
from server.build.evaluate import evaluate
from server.build.pipeline import ANCHOR_SIZES, BuildError, BuildSettings, build_bank
from server.build.synth import generate_corpus
from server.model.errors import ModelError
from server.model.memory import LORA_TARGETS, MemoryType
from server.router.errors import RouterError
from server.serve import register as register_serve
from server.settings import load_settings
from tiers import BytesCodec, TierError, build_store, load_profiles

# Errors that describe something the user can fix: reported in one line, never as a traceback.
USER_ERRORS = (TierError, BuildError, CorpusError, ModelError, BankError, RouterError)


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


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _build(args: argparse.Namespace) -> int:
    settings = BuildSettings(
        corpus=args.corpus,
        out=args.out,
        levels=args.levels,
        branching=args.branching,
        widths=args.widths or BuildSettings.default_widths(args.levels),
        memory_type=MemoryType(args.memory_type),
        lora_targets=tuple(args.lora_targets.split(",")),
        embedder=args.embedder,
        embed_dim=args.embed_dim,
        minilm_dir=args.minilm_dir,
        anchor_size=args.anchor_size,
        anchor_dir=args.anchor,
        freeze_anchor=args.freeze_anchor,
        pretrain_steps=args.pretrain_steps,
        memory_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seq_len=args.seq_len,
        dtype=args.dtype,
        seed=args.seed,
        device=args.device,
        bank_id=args.bank_id,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    summary = build_bank(settings)
    print(summary.text())
    return 0


def _add_build(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = BuildSettings(corpus=Path(), out=Path())
    b = commands.add_parser(
        "build",
        help="train a memory bank from a corpus",
        description="Train a memory bank: tokenizer, embeddings, hierarchical clusters, anchor "
        "(pretrained here unless --anchor is given), memories; written atomically to --out.",
    )
    b.add_argument(
        "--corpus", type=Path, required=True, help="JSONL of {'text': ...}, .txt, or a directory"
    )
    b.add_argument("--out", type=Path, required=True, help="bank directory to write")
    b.add_argument("--levels", type=int, default=d.levels, help="cluster tree depth")
    b.add_argument("--branching", type=int, default=d.branching, help="children per cluster")
    b.add_argument("--widths", type=_ints, help="memory width per level, e.g. 64,32 (0: none)")
    b.add_argument(
        "--memory-type", choices=[t.value for t in MemoryType], default=d.memory_type.value
    )
    b.add_argument(
        "--lora-targets", default=",".join(d.lora_targets), help=f"of {','.join(LORA_TARGETS)}"
    )
    b.add_argument("--embedder", choices=["hashed-tfidf", "minilm"], default=d.embedder)
    b.add_argument("--embed-dim", type=int, default=d.embed_dim, help="hashed-tfidf dimensions")
    b.add_argument(
        "--minilm-dir", type=Path, help="all-MiniLM-L6-v2 directory (default: the package)"
    )
    b.add_argument("--anchor-size", choices=list(ANCHOR_SIZES), default=d.anchor_size)
    b.add_argument("--anchor", type=Path, help="existing Hugging Face Llama checkpoint directory")
    b.add_argument(
        "--freeze-anchor", action="store_true", help="add memory post hoc: train memories only"
    )
    b.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    b.add_argument("--steps", type=int, default=d.memory_steps, help="memory training steps")
    b.add_argument("--batch-size", type=int, default=d.batch_size)
    b.add_argument("--lr", type=float, default=d.lr)
    b.add_argument("--seq-len", type=int, default=d.seq_len)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=d.dtype)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    b.add_argument("--bank-id", help="bank id (default: the output directory's name)")
    b.add_argument("--overwrite", action="store_true", help="replace a bank already at --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(run=_build)


def _synth(args: argparse.Namespace) -> int:
    corpus = generate_corpus(
        seed=args.seed,
        invented_entities=args.invented_entities,
        filler_docs=args.filler_docs,
        max_mentions=args.max_mentions,
    )
    corpus.write(args.out)
    print(f"wrote {len(corpus.documents)} documents and {len(corpus.facts)} facts to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    report = evaluate(
        args.bank, args.facts, modes=args.modes.split(","), progress=not args.no_progress
    )
    print(report.table())
    if args.json is not None:
        args.json.write_text(report.to_json())
    return 0


def _demo(args: argparse.Namespace) -> int:
    result = build_demo(args.data_dir, overwrite=args.overwrite, progress=not args.no_progress)
    print(result.summary.text())
    print()
    print(result.report.table())
    return 0


def _add_synth_and_eval(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = commands.add_parser(
        "synth", help="write a synthetic long-tail knowledge corpus (corpus.jsonl, facts.jsonl)"
    )
    s.add_argument("--out", type=Path, required=True, help="directory to write")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--invented-entities", type=int, default=80, help="per invented family")
    s.add_argument("--filler-docs", type=int, default=450, help="general-text documents")
    s.add_argument("--max-mentions", type=int, default=100, help="mentions of the top entity")
    s.set_defaults(run=_synth)
    e = commands.add_parser(
        "eval", help="long-tail accuracy by frequency bucket, with memory and without"
    )
    e.add_argument("--bank", type=Path, required=True)
    e.add_argument("--facts", type=Path, required=True, help="facts.jsonl from hmem synth")
    e.add_argument("--modes", default="memory,anchor,generic")
    e.add_argument("--json", type=Path, help="also write the full report as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(run=_eval)
    d = commands.add_parser(
        "demo", help="build the demo bank from the synthetic corpus (fixed seeds) and evaluate it"
    )
    d.add_argument("--data-dir", type=Path, help="default: $HMEM_DATA_DIR or ~/.local/share/hmem")
    d.add_argument("--overwrite", action="store_true", help="rebuild an existing demo bank")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmem", description="Tiered memory-serving inference server."
    )
    parser.add_argument("--version", action="version", version=f"hmem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_build(commands)
    _add_synth_and_eval(commands)
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except USER_ERRORS as exc:
        print(f"hmem: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`hmem eval | head`): stop quietly, as other CLI tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
