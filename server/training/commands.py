"""The training commands: `hmem build`, `hmem synth`, `hmem eval` and `hmem demo`.

`server.cli` registers these only when one of them is the command being run, so that
`hmem serve` and the other serving commands never import the training package.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from server.model.memory import LORA_TARGETS, MemoryType
from server.training.corpus import CorpusError
from server.training.demo import build_demo
from server.training.evaluate import evaluate
from server.training.pipeline import ANCHOR_SIZES, BuildError, BuildSettings, build_bank
from server.training.synth import generate_corpus

# Errors that describe something the user can fix: `hmem` prints them as one line.
USER_ERRORS = (BuildError, CorpusError)


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


def _add_build(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], helps: Mapping[str, str]
) -> None:
    d = BuildSettings(corpus=Path(), out=Path())
    b = commands.add_parser(
        "build",
        help=helps["build"],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    b.set_defaults(run=_build, user_errors=USER_ERRORS)


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


def _add_synth_and_eval(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], helps: Mapping[str, str]
) -> None:
    s = commands.add_parser("synth", help=helps["synth"])
    s.add_argument("--out", type=Path, required=True, help="directory to write")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--invented-entities", type=int, default=80, help="per invented family")
    s.add_argument("--filler-docs", type=int, default=450, help="general-text documents")
    s.add_argument("--max-mentions", type=int, default=100, help="mentions of the top entity")
    s.set_defaults(run=_synth, user_errors=USER_ERRORS)
    e = commands.add_parser("eval", help=helps["eval"])
    e.add_argument("--bank", type=Path, required=True)
    e.add_argument("--facts", type=Path, required=True, help="facts.jsonl from hmem synth")
    e.add_argument("--modes", default="memory,anchor,generic")
    e.add_argument("--json", type=Path, help="also write the full report as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(run=_eval, user_errors=USER_ERRORS)
    d = commands.add_parser("demo", help=helps["demo"])
    d.add_argument("--data-dir", type=Path, help="default: $HMEM_DATA_DIR or ~/.local/share/hmem")
    d.add_argument("--overwrite", action="store_true", help="rebuild an existing demo bank")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=_demo, user_errors=USER_ERRORS)


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], helps: Mapping[str, str]
) -> None:
    """Add the training commands, each with its one-line help from `helps`."""
    _add_build(commands, helps)
    _add_synth_and_eval(commands, helps)
