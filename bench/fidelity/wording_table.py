"""Table 6 of bench.fidelity, routing that survives new wording: its numbers (from the routing
measurements and the builds of each embedder), its markdown section and its figure.

Routing cells of several clustering seeds are pooled (correct and total summed over seeds), so a
cell's accuracy is the mean over seeds; the spread of all facts' accuracy is kept beside it. The
embedder that routes best is the one with the highest accuracy on all wording-disjoint queries
(the rare buckets break a tie, then the default wins it); the goal is that the build's default
embedder is that one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.fidelity.builds import DISJOINT, Plan
from server.routing import EMBEDDERS

KINDS = {"own": "the corpus's words", "disjoint": "new words"}


def _pool(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    correct, total = sum(c["correct"] for c in cells), sum(c["total"] for c in cells)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


def _pooled(runs: Sequence[dict[str, Any]], kind: str, level: str) -> dict[str, Any]:
    first = runs[0][kind][level]
    return {
        "buckets": {
            b: _pool([r[kind][level]["buckets"][b] for r in runs]) for b in first["buckets"]
        },
        **{k: _pool([r[kind][level][k] for r in runs]) for k in ("all", "rarest", "rare")},
    }


def summarise_wording(
    plans: Mapping[str, Plan],
    built: Mapping[str, dict[str, Any]],
    evals: Mapping[tuple[str, str], dict[str, Any]],
    routing: Sequence[dict[str, Any]],
    reworded: Mapping[str, Any],
) -> dict[str, Any]:
    """Per embedder: routing (own and new words, leaf and level 1, pooled over seeds), the time
    it adds to a build, and, where it was built, accuracy on the new words with memory and the
    anchor alone and the built bank's routing; which embedder routes the new words best."""
    default = plans["ffn"].settings.embedder
    builds = {p.settings.embedder: name for name, p in plans.items() if name == "ffn" or p.optional}
    out: dict[str, Any] = {}
    for embedder, description in EMBEDDERS.items():
        runs = sorted((r for r in routing if r["embedder"] == embedder), key=lambda r: r["seed"])
        if not runs:
            continue
        entry: dict[str, Any] = {
            "description": description,
            "default": embedder == default,
            "seeds": [r["seed"] for r in runs],
            "embed_s": sum(r["embed_s"] for r in runs) / len(runs),
            "cluster_s": sum(r["cluster_s"] for r in runs) / len(runs),
            "texts": runs[0]["texts"],
            "unheld": runs[0]["unheld"],
            "routing": {
                kind: {level: _pooled(runs, kind, level) for level in ("leaf", "level1")}
                for kind in KINDS
            },
            "spread": {kind: [r[kind]["leaf"]["all"]["accuracy"] for r in runs] for kind in KINDS},
            "build": builds.get(embedder),
        }
        name = builds.get(embedder)
        got = built.get(name) if name else None
        if got is not None and "error" in got:
            entry["error"] = got["error"]
        elif name is not None and (name, DISJOINT) in evals:
            answered = evals[(name, DISJOINT)]
            entry["answers"] = {
                mode: cells["buckets"] | {k: cells[k] for k in ("all", "rarest", "rare")}
                for mode, cells in answered["accuracy"].items()
            }
            entry["bank_routing"] = answered["routing"]["buckets"] | {
                k: answered["routing"][k] for k in ("all", "rarest", "rare")
            }
            entry["build_s"] = got.get("seconds") if got else None
        out[embedder] = entry
    best = max(  # a tie goes to the default: a change must route better to be one
        out,
        key=lambda e: (
            *(out[e]["routing"]["disjoint"]["leaf"][k]["accuracy"] or 0.0 for k in ("all", "rare")),
            e == default,
        ),
        default=None,
    )
    return {
        "embedders": out,
        "default": default,
        "best": best,
        "asked": reworded["asked"],
        "unasked": reworded["unasked"],
        "templates": reworded["templates"],
    }


def wording_goal(t6: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's goal: the build's default embedder is the one that routes new words best."""
    routed = {
        e: v["routing"]["disjoint"]["leaf"]["all"]["accuracy"] for e, v in t6["embedders"].items()
    }
    return {
        "goal": "the default embedder routes wording-disjoint queries best of those measured",
        "default": t6["default"],
        "best": t6["best"],
        "routed": routed,
        "met": t6["default"] == t6["best"],
    }


# -- markdown -----------------------------------------------------------------------------------


def _cell(c: Mapping[str, Any] | None) -> str:
    if c is None or c["accuracy"] is None:
        return "-"
    return f"{100 * c['accuracy']:.1f}% ({c['correct']}/{c['total']})"


def _pct(c: Mapping[str, Any] | None) -> str:
    return "-" if c is None or c["accuracy"] is None else f"{100 * c['accuracy']:.1f}%"


def _row(values: Sequence[object]) -> str:
    return "| " + " | ".join(map(str, values)) + " |"


def section_wording(r: Mapping[str, Any], png: str) -> list[str]:
    t6 = r["accuracy"]["wording"]
    emb = t6["embedders"]
    names = list(emb)
    keys = [*map(str, r["buckets"]), "all"]
    seeds = len(next(iter(emb.values()))["seeds"]) if emb else 0
    lines = [
        "## 6. Routing that survives new wording (each embedder)",
        "",
        f"Every fact asked in words no document uses but its entity's name: {t6['asked']} facts "
        f"asked ({', '.join(f'{k}: {v} not' for k, v in t6['unasked'].items()) or 'all'}); "
        "e.g. " + "; ".join(f'"{ts[0]}"' for ts in t6["templates"].values()) + ". Routed "
        "right: the query's leaf holds a window or restated sentence stating the fact; "
        f"clustered as the build clusters, without training, {seeds} seed(s) pooled.",
        "",
        _row(["bucket", *(f"{n}: own words / new words" for n in names)]),
        _row(["---"] * (1 + len(names))),
    ]
    for k in keys:
        cells = []
        for n in names:
            rt = emb[n]["routing"]
            own, new = (
                rt[kind]["leaf"] if k == "all" else rt[kind]["leaf"]["buckets"][k]
                for kind in ("own", "disjoint")
            )
            cells.append(
                f"{_pct(own if k != 'all' else own['all'])} / "
                f"{_pct(new if k != 'all' else new['all'])}"
            )
        lines.append(_row([k, *cells]))
    lines += [
        "",
        _row(
            [
                "embedder",
                "what",
                "new words: level 1",
                "new words: all, per seed",
                "embed s",
                "cluster s",
                "texts",
            ]
        ),
        _row(["---"] * 7),
    ]
    for n, e in emb.items():
        spread = ", ".join(f"{100 * a:.1f}%" for a in e["spread"]["disjoint"])
        mark = " (default)" if e["default"] else ""
        lines.append(
            _row(
                [
                    f"{n}{mark}",
                    e["description"],
                    _pct(e["routing"]["disjoint"]["level1"]["all"]),
                    spread,
                    f"{e['embed_s']:.1f}",
                    f"{e['cluster_s']:.1f}",
                    e["texts"],
                ]
            )
        )
    built = [n for n in names if "answers" in emb[n]]
    lines += [
        "",
        "Answers on the new words, from the default build with each embedder "
        "(routed: the built bank's router):",
        "",
    ]
    if built:
        lines.append(_row(["bucket", *(f"{n}: routed / memory / anchor" for n in built)]))
        lines.append(_row(["---"] * (1 + len(built))))
        for k in keys:
            lines.append(
                _row(
                    [
                        k,
                        *(
                            f"{_cell(emb[n]['bank_routing'][k])} / "
                            f"{_cell(emb[n]['answers']['memory'][k])} / "
                            f"{_cell(emb[n]['answers']['anchor'][k])}"
                            for n in built
                        ),
                    ]
                )
            )
    for n in names:
        if "error" in emb[n]:
            lines.append(f"- {n}: not built: {emb[n]['error']}")
    g = r["goals"]["wording"]
    lines += [
        "",
        f"Goal ({g['goal']}): best {g['best']} "
        f"({_pct({'accuracy': g['routed'][g['best']]}) if g['best'] else '-'}), default "
        f"{g['default']}: {'**met**' if g['met'] else '**not met**'}.",
        "",
        f"![routing in new words]({png})",
        "",
    ]
    return lines


# -- the figure ---------------------------------------------------------------------------------


def plot_wording(ax: Any, r: Mapping[str, Any]) -> None:
    emb, keys = r["accuracy"]["wording"]["embedders"], [*map(str, r["buckets"]), "all"]
    width = 0.8 / max(1, len(emb))
    for i, (name, e) in enumerate(emb.items()):
        xs = [k + (i - (len(emb) - 1) / 2) * width for k in range(len(keys))]
        leaf = e["routing"]["disjoint"]["leaf"]
        ys = [
            100 * ((leaf["all"] if k == "all" else leaf["buckets"][k])["accuracy"] or 0.0)
            for k in keys
        ]
        ax.bar(xs, ys, width, label=f"{name}{' (default)' if e['default'] else ''}")
        own = e["routing"]["own"]["leaf"]
        ax.plot(
            xs,
            [
                100 * ((own["all"] if k == "all" else own["buckets"][k])["accuracy"] or 0.0)
                for k in keys
            ],
            "k_",
            markersize=6,
        )
    ax.plot([], [], "k_", label="in the corpus's own words")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_xlabel("frequency bucket (0 = most mentioned); bars: queries in new words")
    ax.set_title("6. routed to a leaf holding the fact, per embedder")
