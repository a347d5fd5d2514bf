"""Fidelity: the paper's findings on long-tail facts, reproduced at small scale by real builds.

Each finding is a markdown table in report.md, a PNG beside it, and numbers in fidelity.json:

1. Accuracy by frequency bucket with the routed memory, the anchor alone and the generic memory,
   from one build with `BuildSettings`' defaults (paper §7: rarest bucket 17% -> 83%, 1.4B).
2. FFN- vs LoRA- vs KV-memories at equal fetched parameters per path (§2.4: FFN wins at every
   size): the default FFN widths, and per level the LoRA rank and the KV pair count whose block
   has the parameter count nearest the FFN block's (counted from `MemoryParams`, as `hmem build`
   counts its fetch).
3. Accuracy against memory size: the default FFN widths scaled (`--scales`), x = parameters
   fetched per path as % of the anchor, with the anchor alone beside it (§4, §9).
4. Blocking (§6: blocking the best-matching 1/16 of the bank dropped accuracy 70% -> 20%): on
   the default build, every fact has its j best-matching level-1 subtrees blocked
   (`level1_ranking`), j = 0..branching, and as the control j random ones (seeded); the fact is
   routed through the nearest unblocked subtree (`evaluate(..., blocked=...)`).
5. int8 weights (not the paper's; the issue's quality check of `--weights int8` and int8 banks):
   the default build's bank converted to int8 (`convert_bank`) and its anchor quantized
   (`Anchor.quantize_int8`), against the float model, in float32 and in bfloat16: accuracy by
   bucket with memory and the anchor alone, and the mean and max absolute difference of the
   log-probabilities of the float model's chosen tokens (`bench.fidelity.int8`).
6. Routing that survives new wording (not the paper's; the issue's): every fact asked in words no
   document uses (`bench.fidelity.wording`), and for each embedder of `server.routing.EMBEDDERS`
   the share of queries routed to a leaf that holds their fact, by bucket, in the corpus's own
   words and in the new ones, clustered as the build clusters but without training
   (`bench.fidelity.routing`; over `--routing-seeds` seeds), with the time each embedder adds to
   a build; and beside it, from the default build with each embedder ("ffn-<embedder>"),
   accuracy on the new wording with memory and the anchor alone and the built bank's routing.
   An embedder the build refuses (`hmem build --embedder`) is reported as not built.

Whether the paper's ordering holds here (FFN > LoRA > KV, more memory better, best-first blocking
worse than random, memory beats the anchor on the rarest bucket) is computed from the numbers.

Every build takes `BuildSettings`' defaults but for what a table varies (memory type, widths)
and what the flags set (--quick: a tiny corpus, the tiny anchor, 20 + 20 steps, 2 levels of 4).
Builds are independent `build_bank` runs in worker processes (`--jobs`, one torch thread each),
each in its own directory under `--work` (default OUT/work) named by its settings' fingerprint:
a directory that already holds a bank is reused, so a run stopped midway continues where it was
(a half-done build resumes from its checkpoints). Evaluations run in the same pool as builds
finish; each writes its predictions beside its bank (`eval-<label>.json`).

    python -m bench.fidelity [--source synthetic|geonames | --corpus DIR] [--quick]
                             [--jobs N] [--scales 0.5,1,2] [--out bench/out/fidelity]
                             [--only buckets,types,sizes,blocking,int8,wording]
                             [--routing-seeds N]

--only runs a subset of the tables: only the builds and evaluations they need (the default build
always: tables 2 and 3 compare with it), and writes report.md, fidelity.json and the PNGs of just
those; the ordering checks cover only what was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.machine import command_line, machine
from bench.fidelity.builds import (
    TABLES,
    Plan,
    eval_tasks,
    one_thread,
    plan_builds,
    run_build,
    run_eval,
)
from bench.fidelity.int8 import Int8Task, run_int8
from bench.fidelity.markdown import report_markdown
from bench.fidelity.plots import PNGS, write_plots
from bench.fidelity.report import summarise
from bench.fidelity.routing import RoutingTask, run_routing
from bench.fidelity.wording import disjoint_queries
from server.cli.training import DefaultsHelpFormatter
from server.routing import EMBEDDERS
from server.training.corpus import load_corpus
from server.training.facts import FACTS_FILE, Fact
from server.training.pipeline import ANCHOR_SIZES, BuildError, BuildSettings
from server.training.queries import load_queries
from server.training.realdata import geonames_corpus
from server.training.synth import CORPUS_FILE, PHRASINGS, SynthCorpus, generate_corpus
from server.training.threads import usable_cores

DEFAULTS = BuildSettings(corpus=Path(), out=Path())
SCALES = (0.5, 1.0, 2.0)
# --quick: a tiny corpus and build, so that the whole bench runs in about a minute on one core.
QUICK_SCALES = (0.5, 1.0)
QUICK = {"levels": 2, "branching": 4, "anchor_size": "tiny", "pretrain_steps": 20, "steps": 20}
QUICK_CORPUS = {"entities": 20, "filler_docs": 40}  # entities: also the top mention count


# -- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    corpus: Path  # corpus.jsonl
    facts: Path  # facts.jsonl, or a plain query file
    description: dict[str, Any]


def prepare_corpus(args: argparse.Namespace, work: Path) -> Corpus:
    """--corpus DIR as it is, or the --source corpus written under `work` (a seed: its bytes)."""
    if args.corpus is not None:
        corpus, facts = args.corpus / CORPUS_FILE, args.corpus / FACTS_FILE
        for path in (corpus, facts):
            if not path.is_file():
                raise SystemExit(f"--corpus {args.corpus}: no {path.name} there")
        return Corpus(corpus, facts, {"source": f"directory {args.corpus}"})
    synth: SynthCorpus
    seed, phrasing, n = args.seed, args.phrasing, QUICK_CORPUS["entities"]
    if args.source == "geonames" and args.quick:
        synth = geonames_corpus(
            seed=seed,
            phrasing=phrasing,
            families=("city",),
            cities=n,
            max_mentions=n,
            filler_docs=QUICK_CORPUS["filler_docs"],
        )
    elif args.source == "geonames":
        synth = geonames_corpus(seed=seed, phrasing=phrasing)
    elif args.quick:
        synth = generate_corpus(
            seed=seed,
            phrasing=phrasing,
            families=("island",),
            invented_entities=n,
            max_mentions=n,
            filler_docs=QUICK_CORPUS["filler_docs"],
        )
    else:
        synth = generate_corpus(seed=seed, phrasing=phrasing)
    out = work / f"corpus-{args.source}-{args.phrasing}-{args.seed}{'-quick' * args.quick}"
    synth.write(out)
    settings = {k: v for k, v in synth.settings.items() if k != "source"}
    return Corpus(out / CORPUS_FILE, out / FACTS_FILE, {"source": args.source} | settings)


def write_disjoint(corpus: Corpus, facts: Sequence[Fact], work: Path) -> tuple[Path | None, Any]:
    """The facts asked in words no document uses, as a facts file under `work` (named by the
    corpus's bytes), and what could not be so asked; no file when no fact could."""
    reworded = disjoint_queries(facts, [d.text for d in load_corpus(corpus.corpus)])
    info = {"asked": len(reworded.facts), "unasked": reworded.unasked}
    if not reworded.facts:
        return None, info | {"templates": {}}
    digest = hashlib.sha256(corpus.corpus.read_bytes()).hexdigest()[:10]
    path = work / f"disjoint-{digest}.jsonl"
    lines = [json.dumps(dataclasses.asdict(f), ensure_ascii=False) for f in reworded.facts]
    path.write_text("\n".join(lines) + "\n")
    return path, info | {"templates": reworded.templates, "file": str(path)}


def describe_corpus(corpus: Corpus, facts: Sequence[Fact]) -> dict[str, Any]:
    with corpus.corpus.open("rb") as f:
        documents = sum(1 for line in f if line.strip())
    families = {
        fam: sum(f.family == fam for f in facts) for fam in dict.fromkeys(f.family for f in facts)
    }
    return corpus.description | {
        "corpus": str(corpus.corpus),
        "facts_file": str(corpus.facts),
        "documents": documents,
        "facts": len(facts),
        "families": families,
        "buckets": sorted({f.bucket for f in facts}),
    }


# -- the builds ---------------------------------------------------------------------------------


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def base_settings(args: argparse.Namespace, corpus: Corpus) -> BuildSettings:
    """The default build: `BuildSettings`' defaults but for what the flags (or --quick) set; one
    torch thread (builds run side by side), no progress bars. Widths: the default ones at the
    default depth, `BuildSettings.default_widths(levels)` at another (as `hmem build` does)."""
    levels = args.levels or DEFAULTS.levels
    widths = DEFAULTS.widths if levels == DEFAULTS.levels else BuildSettings.default_widths(levels)
    return dataclasses.replace(
        DEFAULTS,
        corpus=corpus.corpus,
        levels=levels,
        widths=widths,
        branching=args.branching or DEFAULTS.branching,
        anchor_size=args.anchor_size or DEFAULTS.anchor_size,
        anchor_dir=args.anchor,
        pretrain_steps=_given(args.pretrain_steps, DEFAULTS.pretrain_steps),
        memory_steps=_given(args.steps, DEFAULTS.memory_steps),
        seed=args.seed,
        device=args.device,
        threads=1,
        progress=False,
    )


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Results:
    built: dict[str, dict[str, Any]]  # by build; {"error": ...} for an optional build refused
    evals: dict[tuple[str, str], dict[str, Any]]  # by (build, evaluation label)
    routing: list[dict[str, Any]]  # `run_routing`'s, one per (embedder, seed)


def run_all(
    plans: dict[str, Plan],
    corpus: Corpus,
    rare: tuple[int, ...],
    args: argparse.Namespace,
    disjoint: Path | None,
) -> Results:
    """Every build, then its evaluations as it finishes, and table 6's routing measurements, on
    `args.jobs` worker processes."""
    built: dict[str, dict[str, Any]] = {}
    evals: dict[tuple[str, str], dict[str, Any]] = {}
    routing: list[dict[str, Any]] = []
    pending: dict[Future[dict[str, Any]], tuple[str, str]] = {}
    left: dict[str, int] = {}  # evaluations not yet done, per build
    pool = ProcessPoolExecutor(
        max_workers=args.jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=one_thread,
    )
    try:
        for name, plan in plans.items():
            pending[pool.submit(run_build, plan.settings)] = (name, "")
        if "wording" in args.only and disjoint is not None:
            base = plans["ffn"].settings
            for embedder in EMBEDDERS:
                for seed in range(base.seed, base.seed + args.routing_seeds):
                    routed = RoutingTask(embedder, seed, base, corpus.facts, rare)
                    pending[pool.submit(run_routing, routed)] = ("", f"routing {embedder} {seed}")
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                name, label = pending.pop(future)
                try:
                    result = future.result()
                except BuildError as exc:
                    if label or not plans[name].optional:
                        raise
                    # Another embedder than the default, which this pipeline does not build.
                    built[name] = {"error": str(exc)}
                    print(f"[{len(built)}/{len(plans)}] {name}: not built: {exc}", flush=True)
                    continue
                except Exception as exc:
                    what = f"evaluation {label} of {name}" if label else f"build {name}"
                    print(f"{what} failed: {type(exc).__name__}: {exc}", flush=True)
                    raise
                if not name:
                    routing.append(result)
                    print(
                        f"      {label}: {result['embed_s']:.1f} s to embed "
                        f"{result['texts']} texts",
                        flush=True,
                    )
                    continue
                if label:
                    evals[(name, label)] = result
                    left[name] -= 1
                    if not left[name]:
                        asked = [r for (n, _), r in evals.items() if n == name]
                        seconds = sum(r["wall_s"] for r in asked)
                        print(f"      {name}: {len(asked)} evaluation(s) in {seconds:.0f} s")
                    continue
                built[name] = result
                plan = plans[name]
                how = (
                    f"reused ({plan.settings.out})"
                    if result["reused"]
                    else f"built in {result['seconds']:.0f} s"
                )
                print(
                    f"[{len(built)}/{len(plans)}] {name} ({plan.memory_type.value}, widths "
                    f"{','.join(map(str, plan.widths))}): {how}",
                    flush=True,
                )
                tasks = eval_tasks(plan, corpus.facts, rare, args.seed, args.only, disjoint)
                left[name] = len(tasks)
                for task in tasks:
                    pending[pool.submit(run_eval, task)] = (name, task.label)
                if name == "ffn" and "int8" in args.only:
                    int8 = Int8Task(name, plan.settings.out, corpus.facts, rare, args.device)
                    left[name] += 1
                    pending[pool.submit(run_int8, int8)] = (name, "int8")
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return Results(built, evals, routing)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _tables(text: str) -> tuple[str, ...]:
    """--only: a comma list of table names, in report order."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in TABLES]
    if unknown or not names:
        what = f"unknown table(s) {', '.join(map(repr, unknown))}" if unknown else "no table"
        raise argparse.ArgumentTypeError(f"{what}: expected a comma list of {', '.join(TABLES)}")
    return tuple(t for t in TABLES if t in names)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m bench.fidelity",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("bench/out/fidelity"), help="report directory")
    p.add_argument("--work", type=Path, help="build directories (default: OUT/work)")
    p.add_argument(
        "--source",
        choices=["synthetic", "geonames"],
        default="synthetic",
        help="the corpus generated (hmem synth --source)",
    )
    p.add_argument(
        "--phrasing",
        choices=list(PHRASINGS),
        default="paraphrase",
        help="how the generated corpus states its facts",
    )
    p.add_argument(
        "--corpus",
        type=Path,
        help="a directory with corpus.jsonl and facts.jsonl, instead of --source",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny corpus, tiny anchor, 20+20 steps, 2 levels of 4, scales 0.5,1 (a smoke test)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=usable_cores(),
        help="worker processes (builds and evaluations, one torch thread each)",
    )
    p.add_argument(
        "--only",
        type=_tables,
        default=TABLES,
        metavar="TABLES",
        help=f"the tables to produce, a comma list of {', '.join(TABLES)} (default: all); "
        "only their builds and evaluations run (the default build always)",
    )
    p.add_argument(
        "--scales",
        type=_floats,
        help=f"FFN width scales of the size sweep "
        f"(default: {','.join(map(str, SCALES))}; --quick: "
        f"{','.join(map(str, QUICK_SCALES))}); 1 is always built",
    )
    for flag, default, what in (
        ("levels", d.levels, "cluster tree depth"),
        ("branching", d.branching, "children per cluster"),
        ("anchor-size", d.anchor_size, "anchor trained from scratch"),
        ("pretrain-steps", d.pretrain_steps, "anchor pretraining steps"),
        ("steps", d.memory_steps, "memory training steps"),
    ):
        key = flag.replace("-", "_")
        p.add_argument(
            f"--{flag}",
            type=str if key == "anchor_size" else int,
            choices=list(ANCHOR_SIZES) if key == "anchor_size" else None,
            help=f"{what} (default: BuildSettings' {default}; --quick: {QUICK[key]})",
        )
    p.add_argument(
        "--anchor",
        type=Path,
        help="a checkpoint every build trains memories on, frozen (hmem build --anchor; "
        "docs/models.md), instead of an anchor pretrained on the corpus",
    )
    p.add_argument(
        "--routing-seeds",
        type=int,
        default=1,
        help="table 6: clusterings measured per embedder, seeds SEED.. (routing only, no build)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="builds, corpus and random blocking")
    p.add_argument("--device", default=d.device, help="builds and evaluations (cpu, cuda)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.scales = args.scales or (QUICK_SCALES if args.quick else SCALES)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.routing_seeds < 1:
        p.error("--routing-seeds must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    info = machine()
    command = command_line()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}")
    print(f"command: {command}", flush=True)
    started = time.perf_counter()
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    corpus = prepare_corpus(args, work)
    facts = load_queries(corpus.facts)
    buckets = sorted({f.bucket for f in facts})
    rare = tuple(buckets[-2:])
    plans = plan_builds(base_settings(args, corpus), args.scales, work, args.only)
    described = describe_corpus(corpus, facts)
    disjoint, reworded = write_disjoint(corpus, facts, work)
    print(
        f"corpus: {described['documents']} documents, {len(facts)} facts, buckets "
        f"{','.join(map(str, buckets))}; tables {','.join(args.only)}: {len(plans)} builds on "
        f"{args.jobs} worker(s) in {work}",
        flush=True,
    )
    got = run_all(plans, corpus, rare, args, disjoint if "wording" in args.only else None)
    elapsed = time.perf_counter() - started
    results = summarise(plans, got.built, got.evals, facts, rare, args.only, got.routing, reworded)
    settings = plans["ffn"].settings
    header = {
        "command": command,
        "machine": info,
        "corpus": described,
        "settings": {
            k: str(v)
            for k, v in dataclasses.asdict(settings).items()
            if k not in ("corpus", "out", "progress", "overwrite", "bank_id")
        },
        "work": str(work),
        "elapsed_s": elapsed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report = header | results
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    for table in TABLES:  # a figure left by an earlier run of another table: not this run's
        if table not in results["tables"]:
            (args.out / PNGS[table]).unlink(missing_ok=True)
    pngs = write_plots(report, args.out)
    text = report_markdown(report, {t: p.name for t, p in pngs.items()})
    (args.out / "report.md").write_text(text)
    print(f"\n{text}")
    print(f"wrote {args.out / 'report.md'}, fidelity.json and {len(pngs)} PNG(s) ({elapsed:.0f} s)")
