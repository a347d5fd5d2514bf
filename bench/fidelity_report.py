"""The output of bench/fidelity.py: the numbers of the tables it measured (all four, or those of
--only), the issue's goals and whether the paper's ordering holds in them, and the markdown report
(the plots: fidelity_plots.py). A table not measured has no numbers; its claims are listed as not
measured in this run.

Accuracy cells are `Tally.as_dict()`s ({"correct", "total", "accuracy"}); "rarest" is the rarest
bucket that holds facts, "rare" the two rarest pooled (`EvalReport.rarest_buckets`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from bench.fidelity_builds import TABLES, Plan
from server.training.facts import Fact

TYPES = ("ffn", "lora", "kv")
METRICS = {"rarest": "rarest bucket", "rare": "rare buckets", "all": "all facts"}


# -- the numbers --------------------------------------------------------------------------------


def _acc(cell: dict[str, Any]) -> float:
    return float(cell["accuracy"] or 0.0)


def _metrics(accuracy: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {m: accuracy[m] for m in names}


def summarise(
    plans: dict[str, Plan],
    built: dict[str, dict[str, Any]],
    evals: dict[tuple[str, str], dict[str, Any]],
    facts: Sequence[Fact],
    rare: tuple[int, ...],
    tables: Sequence[str] = TABLES,
) -> dict[str, Any]:
    """The builds, the accuracy cells of the tables measured (`tables`), the issue's goals and
    the paper's ordering checks on them; nothing of a table not measured."""
    builds = {}
    for name, plan in plans.items():
        got, fetched = built[name], sum(plan.fetched)
        builds[name] = {
            "memory_type": plan.memory_type.value,
            "widths": list(plan.widths),
            "fetched_per_level": plan.fetched,
            "fetched_params": fetched,
            "fetched_reported": got.get("fetched_params"),  # `hmem build`'s count, when it ran
            "anchor_params": got["anchor_params"],
            "fetched_share": fetched / got["anchor_params"],
            "scales": plan.scales,
            "bank": str(plan.settings.out),
            "build_s": got.get("seconds"),
            "reused": got["reused"],
            "pretrain_loss": got.get("pretrain_loss"),
            "memory_loss": got.get("memory_loss"),
        }
    main = evals[("ffn", "main")]["accuracy"]
    b = plans["ffn"].settings.branching
    accuracy: dict[str, Any] = {}
    if "buckets" in tables:
        accuracy["by_bucket"] = {
            mode: acc["buckets"] | {"all": acc["all"]} for mode, acc in main.items()
        }
    if "types" in tables:
        accuracy["memory_types"] = {
            k: _metrics(evals[(k, "main")]["accuracy"]["memory"], list(METRICS)) for k in TYPES
        }
    if "sizes" in tables:
        sweep = sorted(
            (n for n, p in plans.items() if p.scales), key=lambda n: sum(plans[n].fetched)
        )
        accuracy["memory_size"] = {
            n: {
                mode: _metrics(evals[(n, "main")]["accuracy"][mode], ("rarest", "all"))
                for mode in ("memory", "anchor")
            }
            for n in sweep
        }
    if "blocking" in tables:

        def blocked(label: str) -> dict[str, Any]:
            return _metrics(evals[("ffn", label)]["accuracy"]["memory"], ("all", "rarest"))

        best = {str(j): blocked(f"best-{j}") for j in range(b + 1)}
        randomly = {
            str(j): best[str(j)] if j in (0, b) else blocked(f"random-{j}") for j in range(b + 1)
        }
        accuracy["blocking"] = {"best": best, "random": randomly}
    buckets = sorted({f.bucket for f in facts})
    mentions = {
        str(k): [
            max(f.mentions for f in facts if f.bucket == k),
            min(f.mentions for f in facts if f.bucket == k),
        ]
        for k in buckets
    }
    out: dict[str, Any] = {
        "tables": [t for t in TABLES if t in tables],
        "not_measured": [t for t in TABLES if t not in tables],
        "builds": builds,
        "buckets": buckets,
        "bucket_mentions": mentions,
        "bucket_facts": {str(k): sum(f.bucket == k for f in facts) for k in buckets},
        "rarest_bucket": rare[-1],
        "rare_buckets": list(rare),
        "branching": b,
        "accuracy": accuracy,
    }
    if "buckets" in tables:
        memory, anchor = _acc(main["memory"]["rarest"]), _acc(main["anchor"]["rarest"])
        out["rarest_ratio_memory_over_anchor"] = memory / anchor if anchor else None
    return out | {
        "goals": goals(accuracy, rare[-1]),
        "checks": checks(accuracy, builds, b, rare[-1]),
    }


# -- the goals --------------------------------------------------------------------------

GOAL_RATIO, GOAL_MEMORY, GOAL_BLOCKED = 4.0, 0.60, 0.25
_EPS = 1e-12  # accuracies are ratios of counts: 3/5 is 0.6 give or take a rounding


def goals(accuracy: dict[str, Any], rarest_bucket: int) -> dict[str, Any]:
    """The issue's goals, on the tables measured: the rarest bucket with memory >= 4x the anchor
    and >= 60% (table 1); blocking each fact's best-matching level-1 subtree (j = 1) brings the
    rarest bucket to <= 25% (table 4; all facts reported beside it), from above 25% with nothing
    blocked: a rarest bucket the memory never lifted above the bar does not meet it."""
    out: dict[str, Any] = {}
    if "by_bucket" in accuracy:
        t1 = accuracy["by_bucket"]
        memory, anchor = (_acc(t1[mode][str(rarest_bucket)]) for mode in ("memory", "anchor"))
        ratio_met = memory > 0 and memory >= GOAL_RATIO * anchor - _EPS
        memory_met = memory >= GOAL_MEMORY - _EPS
        out["rarest_memory_vs_anchor"] = {
            "goal": f"rarest bucket: memory >= {GOAL_RATIO:g}x the anchor and "
            f">= {100 * GOAL_MEMORY:.0f}%",
            "memory": memory,
            "anchor": anchor,
            "ratio": memory / anchor if anchor else None,  # None: the anchor got none right
            "ratio_met": ratio_met,
            "memory_met": memory_met,
            "met": ratio_met and memory_met,
        }
    if "blocking" in accuracy:
        one, none = accuracy["blocking"]["best"]["1"], accuracy["blocking"]["best"]["0"]
        rarest, unblocked = _acc(one["rarest"]), _acc(none["rarest"])
        # Brought down: above the bar with nothing blocked (a bucket never learnt is no test).
        above = unblocked > GOAL_BLOCKED + _EPS
        out["blocked_best_subtree"] = {
            "goal": "blocking the best-matching level-1 subtree brings the rarest bucket to "
            f"<= {100 * GOAL_BLOCKED:.0f}%",
            "rarest": rarest,
            "all": _acc(one["all"]),
            "rarest_unblocked": unblocked,
            "all_unblocked": _acc(none["all"]),
            "above_unblocked": above,
            "met": above and rarest <= GOAL_BLOCKED + _EPS,
        }
    return out


# -- the paper's ordering -----------------------------------------------------------------------


def claims(branching: int) -> dict[str, list[str]]:
    """The ordering claims checked on each table."""
    return {
        "buckets": ["memory beats the anchor alone on the rarest bucket (§7)"],
        "types": ["FFN > LoRA > KV at equal fetched parameters (§2.4)"],
        "sizes": ["more memory is better: accuracy rises with the fetch (§4, §9)"],
        "blocking": [
            "blocking the best-matching subtree lowers accuracy (§6)",
            f"blocking 1/{branching} best-first drops more than at random",
            f"best-first below random, mean over j = 1..{branching - 1}",
        ],
    }


def _check(claim: str, metric: str, values: dict[str, float], holds: bool) -> dict[str, Any]:
    return {"claim": claim, "metric": metric, "values": values, "holds": holds}


def checks(
    accuracy: dict[str, Any], builds: dict[str, Any], branching: int, rarest_bucket: int
) -> list[dict[str, Any]]:
    """The paper's ordering, tested on these numbers (each claim per metric), on the tables
    measured (those in `accuracy`)."""
    out = []
    claim = claims(branching)
    if "by_bucket" in accuracy:
        table1 = accuracy["by_bucket"]
        rarest = {mode: _acc(table1[mode][str(rarest_bucket)]) for mode in ("memory", "anchor")}
        out.append(
            _check(claim["buckets"][0], "rarest", rarest, rarest["memory"] > rarest["anchor"])
        )
    if "memory_types" in accuracy:
        for metric in METRICS:
            v = {k: _acc(accuracy["memory_types"][k][metric]) for k in TYPES}
            out.append(_check(claim["types"][0], metric, v, v["ffn"] > v["lora"] > v["kv"]))
    if "memory_size" in accuracy:
        for metric in ("rarest", "all"):
            v = {
                f"{100 * builds[n]['fetched_share']:.1f}%": _acc(cells["memory"][metric])
                for n, cells in accuracy["memory_size"].items()
            }
            ys = list(v.values())
            steady = all(a <= b for a, b in itertools.pairwise(ys))
            out.append(
                _check(claim["sizes"][0], metric, v, len(ys) > 1 and steady and ys[-1] > ys[0])
            )
    if "blocking" in accuracy:
        best, rand = accuracy["blocking"]["best"], accuracy["blocking"]["random"]
        lowers, drops, below = claim["blocking"]
        for metric in ("all", "rarest"):
            v = {
                "none blocked": _acc(best["0"][metric]),
                "best-first j=1": _acc(best["1"][metric]),
                "random j=1": _acc(rand["1"][metric]),
            }
            out.append(_check(lowers, metric, v, v["best-first j=1"] < v["none blocked"]))
            out.append(_check(drops, metric, v, v["best-first j=1"] < v["random j=1"]))
            inner = [str(j) for j in range(1, branching)]
            mean_best = sum(_acc(best[j][metric]) for j in inner) / len(inner)
            mean_rand = sum(_acc(rand[j][metric]) for j in inner) / len(inner)
            out.append(
                _check(
                    below,
                    metric,
                    {"best-first": mean_best, "random": mean_rand},
                    mean_best < mean_rand,
                )
            )
    return out


# -- markdown -----------------------------------------------------------------------------------


def cell(c: dict[str, Any]) -> str:
    acc = c["accuracy"]
    return "-" if acc is None else f"{100 * acc:.1f}% ({c['correct']}/{c['total']})"


def _row(values: Sequence[object]) -> str:
    return "| " + " | ".join(map(str, values)) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]


def _ints(values: Sequence[int]) -> str:
    return " / ".join(f"{v:,}" for v in values)


def header_lines(r: dict[str, Any]) -> list[str]:
    m, c = r["machine"], r["corpus"]
    families = ", ".join(f"{k} {v}" for k, v in c["families"].items())
    given = {
        k: v
        for k, v in c.items()
        if k not in ("documents", "facts", "families", "buckets", "corpus", "facts_file")
    }
    settings = ", ".join(
        f"{k} {v}" for k, v in r["settings"].items() if k not in ("memory_type", "widths")
    )
    rows, n = [], len(r["builds"])
    for name, b in r["builds"].items():
        took = "reused" if b["build_s"] is None else f"{b['build_s']:.0f} s"
        if b["reused"] and b["build_s"] is not None:
            took = f"reused (built in {b['build_s']:.0f} s)"
        rows.append(
            [
                name,
                b["memory_type"],
                _ints(b["widths"]),
                f"{b['fetched_params']:,}",
                f"{100 * b['fetched_share']:.1f}%",
                f"{b['anchor_params']:,}",
                took,
            ]
        )
    return [
        "# Fidelity to the paper, at small scale",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}",
        f"- command: `{r['command']}`",
        f"- corpus: {', '.join(f'{k} {v}' for k, v in given.items())}: {c['documents']:,} "
        f"documents, {c['facts']} facts ({families}), buckets "
        f"{', '.join(map(str, c['buckets']))} (0 = most mentioned); rarest = bucket "
        f"{r['rarest_bucket']}, rare = buckets {', '.join(map(str, r['rare_buckets']))} pooled",
        f"- build settings (`BuildSettings`' defaults but where shown; the builds below differ "
        f"only in memory type and widths): {settings}",
        tables_line(r),
        f"- {n} build{'s' * (n != 1)} and {'its' if n == 1 else 'their'} evaluations in "
        f"{r['elapsed_s']:.0f} s "
        f"(build directories under {r['work']}):",
        "",
        *_table(
            [
                "build",
                "memory",
                "widths per level",
                "fetched per path",
                "% of anchor",
                "anchor params",
                "build",
            ],
            rows,
        ),
    ]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _met(met: bool) -> str:
    return "**met**" if met else "**not met**"


TITLES = {
    "buckets": "1. Accuracy by frequency bucket (the default build)",
    "types": "2. FFN vs LoRA vs KV memories at equal fetched parameters",
    "sizes": "3. Accuracy against memory size (FFN)",
    "blocking": "4. Blocking",
}


def tables_line(r: dict[str, Any]) -> str:
    def named(ts: Sequence[str]) -> str:
        return ", ".join(f"{TABLES.index(t) + 1} ({t})" for t in ts)

    line = f"- tables measured: {named(r['tables'])}"
    if r["not_measured"]:
        line += f"; not measured in this run: {named(r['not_measured'])}"
    return line


def section_buckets(r: dict[str, Any], png: str) -> list[str]:
    t1 = r["accuracy"]["by_bucket"]
    modes = list(t1)
    rows = []
    for k in [*map(str, r["buckets"]), "all"]:
        if k == "all":
            span, n = "", sum(r["bucket_facts"].values())
        else:
            hi, lo = r["bucket_mentions"][k]
            span, n = (str(hi) if hi == lo else f"{hi}-{lo}"), r["bucket_facts"][k]
        rows.append([k, span, n, *(cell(t1[mode][k]) for mode in modes)])
    rarest = str(r["rarest_bucket"])
    ratio = r["rarest_ratio_memory_over_anchor"]
    mem, anc = t1["memory"][rarest]["accuracy"], t1["anchor"][rarest]["accuracy"]
    ratio_text = f"{ratio:.2f}x" if ratio is not None else ("inf" if mem else "n/a (both 0)")
    g = r["goals"]["rarest_memory_vs_anchor"]
    g_ratio = "n/a (anchor 0%)" if g["ratio"] is None else f"{g['ratio']:.2f}x"
    lines = [f"## {TITLES['buckets']}", ""]
    lines += _table(["bucket", "mentions", "facts", *modes], rows)
    lines += [
        "",
        f"Rarest bucket ({rarest}): memory {_pct(mem)} vs anchor {_pct(anc)}, "
        f"memory/anchor = **{ratio_text}**. Paper §7 (1.4B, atomic numbers, rarest of 5 "
        "buckets): 17% without memory, 83% with 10% added memory (4.9x).",
        "",
        f"Goal ({g['goal']}): memory {_pct(g['memory'])}, anchor {_pct(g['anchor'])}, "
        f"ratio {g_ratio}: >= {GOAL_RATIO:g}x {'yes' if g['ratio_met'] else 'no'}, "
        f">= {100 * GOAL_MEMORY:.0f}% {'yes' if g['memory_met'] else 'no'}: {_met(g['met'])}.",
        "",
        f"![accuracy by bucket]({png})",
        "",
    ]
    return lines


def section_types(r: dict[str, Any], png: str) -> list[str]:
    a, builds = r["accuracy"], r["builds"]
    ffn = builds["ffn"]["fetched_params"]
    rows = [
        [
            k,
            _ints(builds[k]["widths"]),
            f"{builds[k]['fetched_params']:,} ({_ints(builds[k]['fetched_per_level'])})",
            f"{builds[k]['fetched_params'] / ffn:.3f}",
            *(cell(a["memory_types"][k][m]) for m in METRICS),
        ]
        for k in TYPES
    ]
    lines = [f"## {TITLES['types']}", ""]
    lines += _table(
        [
            "memory",
            "width per level (neurons / rank / pairs)",
            "fetched per path (per level)",
            "vs FFN",
            *(f"memory: {v}" for v in METRICS.values()),
        ],
        rows,
    )
    lines += [
        "",
        "Widths: FFN the default; LoRA (targets "
        f"{r['settings']['lora_targets']}) and KV the integer per level whose block is "
        "nearest the FFN block in parameters. Paper §2.4: FFN-memories beat LoRA and KV at "
        "every size (frozen 160M).",
        "",
        f"![memory types]({png})",
        "",
    ]
    return lines


def section_sizes(r: dict[str, Any], png: str) -> list[str]:
    a, builds = r["accuracy"], r["builds"]
    rows = []
    for n, cells in a["memory_size"].items():
        bd = builds[n]
        rows.append(
            [
                ",".join(f"{s:g}" for s in bd["scales"]),
                _ints(bd["widths"]),
                f"{bd['fetched_params']:,}",
                f"{100 * bd['fetched_share']:.1f}%",
                *(cell(cells[mode][m]) for mode in ("memory", "anchor") for m in ("rarest", "all")),
            ]
        )
    lines = [f"## {TITLES['sizes']}", ""]
    lines += _table(
        [
            "width scale",
            "widths",
            "fetched per path",
            "% of anchor",
            "memory: rarest",
            "memory: all",
            "anchor alone: rarest",
            "anchor alone: all",
        ],
        rows,
    )
    lines += [
        "",
        "Paper §4/§9: accuracy rises with the fetch at a fixed bank; main runs fetch "
        "about 10% of the anchor.",
        "",
        f"![memory size]({png})",
        "",
    ]
    return lines


def section_blocking(r: dict[str, Any], png: str) -> list[str]:
    b = r["branching"]
    best, rand = r["accuracy"]["blocking"]["best"], r["accuracy"]["blocking"]["random"]
    rows = [
        [
            j,
            f"{int(j) / b:.3f}",
            cell(best[j]["all"]),
            cell(best[j]["rarest"]),
            cell(rand[j]["all"]),
            cell(rand[j]["rarest"]),
        ]
        for j in best
    ]
    g = r["goals"]["blocked_best_subtree"]
    verdict = _met(g["met"])
    if not g["above_unblocked"]:
        verdict += (
            f" (the rarest bucket is at <= {100 * GOAL_BLOCKED:.0f}% with nothing blocked: "
            "there is nothing for blocking to bring down)"
        )
    lines = [
        f"## {TITLES['blocking']}: j of {b} level-1 subtrees blocked per fact (the default build)",
        "",
    ]
    lines += _table(
        [
            "blocked j",
            "fraction of the bank",
            "best-first: all",
            "best-first: rarest",
            "random: all",
            "random: rarest",
        ],
        rows,
    )
    lines += [
        "",
        f"Paper §6 (410M with memories, atomic numbers): blocking the best-matching 1/16 "
        "of the bank dropped accuracy from 70% to 20% (another model, task and branching: "
        f"not a point of this plot). Here j = 1 blocks 1/{b}: all facts "
        f"{_pct(best['0']['all']['accuracy'])} -> {_pct(best['1']['all']['accuracy'])} "
        f"best-first, {_pct(rand['1']['all']['accuracy'])} at random. At j = 0 and j = {b} "
        "the random sets are the best-first ones (nothing, everything blocked).",
        "",
        f"Goal ({g['goal']}): with the best-matching level-1 subtree blocked (j = 1), rarest "
        f"bucket {_pct(g['rarest_unblocked'])} -> {_pct(g['rarest'])}, all facts "
        f"{_pct(g['all_unblocked'])} -> {_pct(g['all'])}: {verdict}.",
        "",
        f"![blocking]({png})",
        "",
    ]
    return lines


SECTIONS = {
    "buckets": section_buckets,
    "types": section_types,
    "sizes": section_sizes,
    "blocking": section_blocking,
}


def report_markdown(r: dict[str, Any], pngs: Mapping[str, str]) -> str:
    """The report: the header, a section per table measured (with its PNG, `pngs[table]`), the
    ordering checks on them and, for a table not measured, its claims marked as such."""
    lines = [*header_lines(r), ""]
    for table in r["tables"]:
        lines += SECTIONS[table](r, pngs[table])
    lines += ["## Does the paper's ordering hold here?", ""]
    for c in r["checks"]:
        values = ", ".join(f"{k} {_pct(v)}" for k, v in c["values"].items())
        verdict = "holds" if c["holds"] else "**does not hold**"
        if len(set(c["values"].values())) == 1:
            verdict += ": all equal"
        lines.append(
            f"- {c['claim']} [{METRICS.get(c['metric'], c['metric'])}]: {verdict} ({values})"
        )
    claim = claims(r["branching"])
    for table in r["not_measured"]:
        lines += [
            f"- {text}: not measured in this run (table {TABLES.index(table) + 1}, {table})"
            for text in claim[table]
        ]
    return "\n".join(lines) + "\n"
