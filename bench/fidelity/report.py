"""The numbers of bench.fidelity: the tables it measured (all six, or those of --only), the
issue's goals and whether the paper's ordering holds in them (the markdown report:
bench.fidelity.markdown; the plots: bench.fidelity.plots). A table not measured has no numbers; its
claims are listed as not measured in this run.

Accuracy cells are `Tally.as_dict()`s ({"correct", "total", "accuracy"}); "rarest" is the rarest
bucket that holds facts, "rare" the two rarest pooled (`EvalReport.rarest_buckets`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from bench.fidelity.builds import TABLES, Plan
from bench.fidelity.wording_table import summarise_wording, wording_goal
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
    routing: Sequence[dict[str, Any]] = (),
    reworded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The builds, the accuracy cells of the tables measured (`tables`), the issue's goals and
    the paper's ordering checks on them; nothing of a table not measured. `routing` and
    `reworded`: table 6's routing measurements and its wording-disjoint queries (a "wording"
    table with no routing measured, as for a corpus whose facts could not be so asked, is
    left out)."""
    builds = {}
    unbuilt = {n: got["error"] for n, got in built.items() if "error" in got}
    for name, plan in plans.items():
        if name in unbuilt:
            continue
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
    int8 = evals[("ffn", "int8")] if "int8" in tables else None
    if int8 is not None:
        accuracy["int8"] = {
            v: {mode: acc["buckets"] | {"all": acc["all"]} for mode, acc in got["accuracy"].items()}
            for v, got in int8["variants"].items()
        }
    if "wording" in tables and routing and reworded is not None:
        accuracy["wording"] = summarise_wording(plans, built, evals, routing, reworded)
    buckets = sorted({f.bucket for f in facts})
    mentions = {
        str(k): [
            max(f.mentions for f in facts if f.bucket == k),
            min(f.mentions for f in facts if f.bucket == k),
        ]
        for k in buckets
    }
    measured = [t for t in TABLES if t in tables and (t != "wording" or "wording" in accuracy)]
    out: dict[str, Any] = {
        "tables": measured,
        "not_measured": [t for t in TABLES if t not in measured],
        "builds": builds,
        "unbuilt": unbuilt,
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
    if int8 is not None:
        out["int8"] = {k: v for k, v in int8.items() if k != "variants"} | {
            "variants": {
                v: {k: x for k, x in got.items() if k != "accuracy"}
                for v, got in int8["variants"].items()
            }
        }
    return out | {
        "goals": goals(accuracy, rare[-1], out.get("int8")),
        "checks": checks(accuracy, builds, b, rare[-1]),
    }


# -- the goals --------------------------------------------------------------------------

GOAL_RATIO, GOAL_MEMORY, GOAL_BLOCKED = 4.0, 0.60, 0.25
# int8 against float (table 5): the chosen tokens' mean |logprob difference|, accuracy points.
GOAL_LOGPROB, GOAL_POINTS = 0.02, 2.0
_EPS = 1e-12  # accuracies are ratios of counts: 3/5 is 0.6 give or take a rounding


def int8_goals(accuracy: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    """Per pair (float32, bfloat16): the mean absolute logprob difference of the float model's
    chosen tokens (its greedy continuation) <= 0.02 with memory and with the anchor alone; every
    bucket's accuracy with memory (and all facts) within 2 points of the float model's (the
    anchor alone reported beside it)."""
    out: dict[str, Any] = {}
    for pair, got in int8["pairs"].items():
        means = {m: got["logprobs"][m]["greedy"]["mean"] for m in got["logprobs"]}
        points = {
            mode: {
                k: 100 * (_acc(accuracy[got["int8"]][mode][k]) - _acc(cell))
                for k, cell in accuracy[got["reference"]][mode].items()
            }
            for mode in ("memory", "anchor")
        }
        worst = {mode: max(abs(d) for d in p.values()) for mode, p in points.items()}
        logprob_met = all(m is not None and m <= GOAL_LOGPROB for m in means.values())
        buckets_met = worst["memory"] <= GOAL_POINTS + 1e-9
        out[pair] = {
            "goal": f"int8 against {pair}: mean |logprob difference| of the chosen tokens "
            f"<= {GOAL_LOGPROB:g}; bucket accuracy with memory within {GOAL_POINTS:g} points",
            "logprob_mean": means,
            "logprob_met": logprob_met,
            "points": points,
            "worst_points": worst,
            "buckets_met": buckets_met,
            "anchor_buckets_met": worst["anchor"] <= GOAL_POINTS + 1e-9,
            "met": logprob_met and buckets_met,
        }
    return out


def goals(
    accuracy: dict[str, Any], rarest_bucket: int, int8: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The issue's goals, on the tables measured: the rarest bucket with memory >= 4x the anchor
    and >= 60% (table 1); blocking each fact's best-matching level-1 subtree (j = 1) brings the
    rarest bucket to <= 25% (table 4; all facts reported beside it), from above 25% with nothing
    blocked: a rarest bucket the memory never lifted above the bar does not meet it; int8 close
    to float (table 5, `int8_goals`; `int8` is its summary); the default embedder routes
    wording-disjoint queries best (table 6, `wording_goal`)."""
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
    if "int8" in accuracy and int8 is not None:
        out["int8"] = int8_goals(accuracy["int8"], int8)
    if "wording" in accuracy:
        out["wording"] = wording_goal(accuracy["wording"])
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
        "int8": [],  # not the paper's: its goals only
        "wording": [],  # not the paper's: its goal only
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
