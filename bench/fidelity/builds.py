"""The builds of bench.fidelity and the work of its worker processes: which builds the tables
need (memory types matched in fetched parameters, the width sweep), one build, one evaluation.

Module-level functions, so that a worker process started by `spawn` imports them by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.fidelity.routing import bank_routing
from server.bank.layout import ModelShape
from server.bank.reader import Bank
from server.model.checkpoint import load_anchor
from server.model.memory import MemoryType
from server.routing import EMBEDDERS
from server.training.evaluate import EvalReport, Tally, evaluate, level1_ranking
from server.training.facts import Fact
from server.training.memory_params import MemoryParams
from server.training.pipeline import ANCHOR_SIZES, BuildSettings, build_bank
from server.training.queries import load_queries

TABLE1_MODES = ("memory", "anchor", "generic")
# The tables, in report order: 1 accuracy by bucket, 2 memory types, 3 memory size, 4 blocking,
# 5 the default build served with int8 weights (bench.fidelity.int8), 6 routing and answers on
# wording-disjoint queries for each embedder (bench.fidelity.routing, bench.fidelity.wording).
TABLES = ("buckets", "types", "sizes", "blocking", "int8", "wording")
DISJOINT = "disjoint"  # the label of an evaluation on wording-disjoint queries


@dataclass
class Plan:
    """One build: its name ("ffn" is the default build), memory and `build_bank` settings."""

    name: str
    memory_type: MemoryType
    widths: tuple[int, ...]
    fetched: list[int]  # parameters of one path's block per level
    scales: list[float]  # the size sweep's scales this build stands for (none: LoRA, KV)
    settings: BuildSettings
    # A build of another embedder (table 6): one the pipeline refuses is reported, not fatal.
    optional: bool = False


# -- the builds ---------------------------------------------------------------------------------


def model_shape(anchor_size: str) -> ModelShape:
    d, n_layers, heads, kv, ff = ANCHOR_SIZES[anchor_size]
    return ModelShape(
        n_layers=n_layers,
        d_model=d,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=d // heads,
        intermediate_size=ff,
    )


def fetched_per_level(
    memory_type: MemoryType, shape: ModelShape, widths: Sequence[int], lora_targets: Sequence[str]
) -> list[int]:
    """Parameters of one path's block at each level, counted as `hmem build` counts its fetch."""
    counts = []
    for width in widths:
        if width == 0:
            counts.append(0)
            continue
        memory = MemoryParams(
            memory_type=memory_type,
            model=shape,
            branching=2,
            widths=(width,),
            seed=0,
            lora_targets=lora_targets if memory_type is MemoryType.LORA else None,
        )
        blocks = memory.path_blocks([0])
        counts.append(sum(t.numel() for b in blocks for t in b.tensors().values()))
    return counts


def matched_widths(
    memory_type: MemoryType, shape: ModelShape, targets: Sequence[int], lora_targets: Sequence[str]
) -> tuple[int, ...]:
    """Per level, the width (LoRA rank, KV pairs) whose block size is nearest `targets[level]`."""
    unit = fetched_per_level(memory_type, shape, [1], lora_targets)[0]
    widths = []
    for target in targets:
        if target == 0:
            widths.append(0)
            continue
        low = max(1, int(target // unit))
        candidates = [low, low + 1]
        sizes = fetched_per_level(memory_type, shape, candidates, lora_targets)
        widths.append(min(zip(candidates, sizes, strict=True), key=lambda c: abs(c[1] - target))[0])
    return tuple(widths)


def plan_builds(
    base: BuildSettings,
    scales: Sequence[float],
    work: Path,
    tables: Sequence[str] = TABLES,
) -> dict[str, Plan]:
    """Every build that `tables` need, from `base` (the default build: FFN, the default widths),
    that one first (it has the most evaluations; every table has it: 2 and 3 compare with it);
    LoRA and KV for "types", the scaled FFN widths for "sizes", the default build with each other
    embedder of `EMBEDDERS` for "wording" ("ffn-<embedder>"). Each in a directory under `work`
    named by its settings and the corpus's bytes."""
    shape = model_shape(base.anchor_size)
    widths = base.widths
    ffn = fetched_per_level(MemoryType.FFN, shape, widths, base.lora_targets)
    wanted: list[tuple[str, MemoryType, tuple[int, ...], float | None, str]] = [
        ("ffn", MemoryType.FFN, widths, 1.0, base.embedder)
    ]
    if "types" in tables:
        for kind in (MemoryType.LORA, MemoryType.KV):
            matched = matched_widths(kind, shape, ffn, base.lora_targets)
            wanted.append((kind.value, kind, matched, None, base.embedder))
    if "sizes" in tables:
        for factor in sorted(set(scales) - {1.0}):
            scaled = tuple(0 if w == 0 else max(1, round(w * factor)) for w in widths)
            wanted.append((f"ffn-x{factor:g}", MemoryType.FFN, scaled, factor, base.embedder))
    if "wording" in tables:
        for embedder in EMBEDDERS:
            if embedder != base.embedder:
                wanted.append((f"ffn-{embedder}", MemoryType.FFN, widths, None, embedder))
    corpus_digest = hashlib.sha256(base.corpus.read_bytes()).hexdigest()[:16]
    plans: dict[str, Plan] = {}
    for name, kind, ws, scale, embedder in wanted:
        same = next(
            (
                p
                for p in plans.values()
                if (p.memory_type, p.widths, p.settings.embedder) == (kind, ws, embedder)
            ),
            None,
        )
        if same is not None:  # a scale that rounds to widths already built
            if scale is not None:
                same.scales.append(scale)
            continue
        settings = dataclasses.replace(base, memory_type=kind, widths=ws, embedder=embedder)
        # The fingerprint of `hmem build`'s resume, of these settings on this corpus's bytes.
        key = dataclasses.replace(settings, corpus=Path(corpus_digest), out=Path("bank"))
        out = work / f"{name}-{key.fingerprint()[:10]}" / "bank"
        fetched = fetched_per_level(kind, shape, ws, base.lora_targets)
        plans[name] = Plan(
            name,
            kind,
            ws,
            fetched,
            [] if scale is None else [scale],
            dataclasses.replace(settings, out=out),
            optional=embedder != base.embedder,
        )
    return plans


# -- the work of one worker process -------------------------------------------------------------


def one_thread() -> None:
    """A worker's initializer: torch on one thread (workers run side by side)."""
    torch.set_num_threads(1)


def run_build(settings: BuildSettings) -> dict[str, Any]:
    """Build the bank at `settings.out`, or reuse the one there; its parameter counts and time."""
    started = time.perf_counter()
    info = settings.out.parent / "summary.json"
    reused = (settings.out / "manifest.json").is_file()
    if not reused:
        summary = build_bank(settings)
        info.write_text(
            json.dumps(
                {
                    "seconds": summary.seconds,
                    "fetched_params": summary.fetched_params,
                    "bank_params": summary.bank_params,
                    "pretrain_loss": summary.pretrain_loss,
                    "memory_loss": summary.memory_loss,
                    "resumed": summary.resumed,
                },
                indent=2,
            )
            + "\n"
        )
    anchor = load_anchor(Bank.open(settings.out).anchor_dir)
    built = json.loads(info.read_text()) if info.is_file() else {}
    return built | {
        "reused": reused,
        "anchor_params": sum(p.numel() for p in anchor.parameters()),
        "wall_s": time.perf_counter() - started,
    }


@dataclass(frozen=True)
class EvalTask:
    build: str
    label: str  # "main", "best-J", "random-J"
    bank: Path
    facts: Path
    modes: tuple[str, ...]
    rare: tuple[int, ...]  # the rarest buckets, rarest last
    block: str | None = None  # "best" or "random"
    j: int = 0
    seed: int = 0
    device: str = "cpu"
    # The build, for routing accuracy beside the answers (wording-disjoint evaluations).
    routed: BuildSettings | None = None


def blocked_sets(task: EvalTask, facts: Sequence[Fact]) -> list[set[int]] | None:
    """Per fact, the level-1 subtrees kept from it: its `j` best-matching, or `j` at random."""
    if task.block is None:
        return None
    if task.block == "best":
        ranking = level1_ranking(task.bank, [f.query for f in facts])
        return [set(row[: task.j]) for row in ranking.tolist()]
    branching = Bank.open(task.bank).manifest.branching
    rng = random.Random(f"hmem-fidelity:{task.seed}:{task.j}")
    return [set(rng.sample(range(branching), task.j)) for _ in facts]


def _pooled(report: EvalReport, mode: str, buckets: Sequence[int]) -> dict[str, Any]:
    tallies = [report.tally(mode, bucket=b) for b in buckets]
    pooled = Tally(sum(t.correct for t in tallies), sum(t.total for t in tallies))
    return pooled.as_dict()


def accuracy_cells(report: EvalReport, rare: tuple[int, ...]) -> dict[str, Any]:
    """Per mode of `report`: a cell per bucket, all facts, the rarest bucket and the rare ones
    pooled (`rare`, rarest last)."""
    return {
        mode: {
            "buckets": {str(b): report.tally(mode, bucket=b).as_dict() for b in report.buckets},
            "all": report.tally(mode).as_dict(),
            "rarest": _pooled(report, mode, rare[-1:]),
            "rare": _pooled(report, mode, rare),
        }
        for mode in report.modes
    }


def run_eval(task: EvalTask) -> dict[str, Any]:
    """Evaluate one bank on the facts (blocked as `task` says); accuracy per mode and bucket."""
    started = time.perf_counter()
    facts = load_queries(task.facts)
    report = evaluate(
        task.bank,
        facts,
        modes=task.modes,
        device=task.device,
        progress=False,
        blocked=blocked_sets(task, facts),
    )
    (task.bank.parent / f"eval-{task.label}.json").write_text(report.to_json())
    out: dict[str, Any] = {"accuracy": accuracy_cells(report, task.rare)}
    if task.routed is not None:
        out["routing"] = bank_routing(task.bank, task.routed, facts, task.rare)
    return out | {"wall_s": time.perf_counter() - started}


def eval_tasks(
    plan: Plan,
    facts: Path,
    rare: tuple[int, ...],
    seed: int,
    tables: Sequence[str] = TABLES,
    disjoint: Path | None = None,
) -> list[EvalTask]:
    """What each build is asked for `tables`: memory and the anchor alone on every build; on the
    default build also the generic memory ("buckets") and the blocking curves ("blocking"); on
    the default build and each other embedder's, the wording-disjoint queries of `disjoint`
    with routing accuracy beside ("wording", when the corpus's facts could be so asked)."""
    s = plan.settings

    def task(label: str, modes: tuple[str, ...], block: str | None = None, j: int = 0) -> EvalTask:
        return EvalTask(plan.name, label, s.out, facts, modes, rare, block, j, seed, s.device)

    reworded = []
    if "wording" in tables and disjoint is not None and (plan.name == "ffn" or plan.optional):
        both = ("memory", "anchor")
        reworded = [
            EvalTask(
                plan.name,
                DISJOINT,
                s.out,
                disjoint,
                both,
                rare,
                seed=seed,
                device=s.device,
                routed=s,
            )
        ]
    if plan.name != "ffn":
        return [task("main", ("memory", "anchor")), *reworded]
    tasks = [task("main", TABLE1_MODES if "buckets" in tables else ("memory", "anchor"))]
    tasks += reworded
    if "blocking" not in tables:
        return tasks
    tasks += [task(f"best-{j}", ("memory",), "best", j) for j in range(s.branching + 1)]
    # Random j = 0 and j = branching block the same sets as best-first: not asked twice.
    tasks += [task(f"random-{j}", ("memory",), "random", j) for j in range(1, s.branching)]
    return tasks
