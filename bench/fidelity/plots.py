"""The figures of bench.fidelity, one PNG per table measured, drawn from the report's JSON
numbers."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fidelity.report import METRICS, TYPES
from bench.fidelity.wording_table import plot_wording

COLORS = {"all": "tab:blue", "rarest": "tab:red"}  # the metrics of the line plots
PNGS = {
    "buckets": "fidelity_buckets.png",
    "types": "fidelity_types.png",
    "sizes": "fidelity_size.png",
    "blocking": "fidelity_blocking.png",
    "int8": "fidelity_int8.png",
    "wording": "fidelity_wording.png",
}


def _acc(cell: dict[str, Any]) -> float:
    return float(cell["accuracy"] or 0.0)


def plot_buckets(ax: Any, r: dict[str, Any]) -> None:
    t1, keys = r["accuracy"]["by_bucket"], [*map(str, r["buckets"]), "all"]
    width = 0.8 / len(t1)
    for i, (mode, cells) in enumerate(t1.items()):
        xs = [k + (i - (len(t1) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [100 * _acc(cells[k]) for k in keys], width, label=mode)
    labels = [
        f"{k}\n({'-'.join(dict.fromkeys(map(str, r['bucket_mentions'][k])))} mentions)"
        for k in keys[:-1]
    ] + ["all"]
    ax.set_xticks(range(len(keys)), labels, fontsize=8)
    ax.set_xlabel("frequency bucket (0 = most mentioned)")
    ax.set_title("1. accuracy by frequency bucket (default build)")


def plot_types(ax: Any, r: dict[str, Any]) -> None:
    a, builds = r["accuracy"], r["builds"]
    for i, k in enumerate(TYPES):
        xs = [m + (i - 1) * 0.27 for m in range(len(METRICS))]
        ys = [100 * _acc(a["memory_types"][k][m]) for m in METRICS]
        ax.bar(xs, ys, 0.27, label=f"{k} ({builds[k]['fetched_params']:,} fetched)")
    ax.set_xticks(range(len(METRICS)), list(METRICS.values()))
    ax.set_title("2. memory types at equal fetched parameters per path")


def plot_sizes(ax: Any, r: dict[str, Any]) -> None:
    a, builds = r["accuracy"], r["builds"]
    names = list(a["memory_size"])
    xs = [100 * builds[n]["fetched_share"] for n in names]
    for mode, style in (("memory", "-"), ("anchor", "--")):
        for metric, color in COLORS.items():
            ys = [100 * _acc(a["memory_size"][n][mode][metric]) for n in names]
            who = "memory" if mode == "memory" else "anchor alone"
            ax.plot(xs, ys, style, color=color, marker="o", label=f"{who}: {METRICS[metric]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(
        xs,
        [
            f"{x:.1f}%\n{','.join(map(str, builds[n]['widths']))}"
            for x, n in zip(xs, names, strict=True)
        ],
        fontsize=8,
    )
    ax.minorticks_off()
    ax.set_xlabel("fetched parameters per path, % of the anchor (FFN widths below)")
    ax.set_title("3. accuracy against memory size")


def plot_blocking(ax: Any, r: dict[str, Any]) -> None:
    b = r["branching"]
    for kind, style in (("best", "-"), ("random", "--")):
        curve = r["accuracy"]["blocking"][kind]
        fractions = [int(j) / b for j in curve]
        for metric, color in COLORS.items():
            ys = [100 * _acc(curve[j][metric]) for j in curve]
            label = f"{'best-first' if kind == 'best' else 'random'}: {METRICS[metric]}"
            ax.plot(fractions, ys, style, color=color, marker="o", label=label)
    ax.set_xlabel(f"fraction of the bank blocked per fact (j / {b} level-1 subtrees)")
    ax.set_title("4. blocking level-1 subtrees (default build)")


def plot_int8(ax: Any, r: dict[str, Any]) -> None:
    t5, keys = r["accuracy"]["int8"], [*map(str, r["buckets"]), "all"]
    width = 0.8 / len(t5)
    for i, (variant, modes) in enumerate(t5.items()):
        xs = [k + (i - (len(t5) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [100 * _acc(modes["memory"][k]) for k in keys], width, label=variant)
        ax.plot(xs, [100 * _acc(modes["anchor"][k]) for k in keys], "k_", markersize=6)
    ax.plot([], [], "k_", label="anchor alone (each variant)")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_xlabel("frequency bucket (0 = most mentioned); bars: with memory")
    ax.set_title("5. int8 weights against float (default build)")


PLOTS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "buckets": plot_buckets,
    "types": plot_types,
    "sizes": plot_sizes,
    "blocking": plot_blocking,
    "int8": plot_int8,
    "wording": plot_wording,
}


def write_plots(r: dict[str, Any], out: Path) -> dict[str, Path]:
    """A figure per table measured (`r["tables"]`), each with the command that produced it at
    the foot; the PNGs by table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    foot = textwrap.fill(
        f"{r['command']}  |  {r['corpus']['documents']} documents, {r['corpus']['facts']} facts",
        150,
    )
    paths = {}
    for table in r["tables"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        PLOTS[table](ax, r)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.text(0.01, 0.01, foot, fontsize=6, color="grey", va="bottom")
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        paths[table] = out / PNGS[table]
        fig.savefig(paths[table], dpi=120)
        plt.close(fig)
    return paths
