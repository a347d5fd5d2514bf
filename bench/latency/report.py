"""Output of bench.latency: the markdown tables, the issue's goals and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.latency.setup import CASES

GOAL_COLD, GOAL_ANALYTIC = 5.0, 1.2


def cell(s: dict[str, Any]) -> str:
    return f"{s['mean_ms']:.1f} ({s['median_ms']:.1f}, {s['p90_ms']:.1f})"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | stream | cache | flat on | hier ms: mean (p50, p90) | flat ms: mean (p50, p90) "
        "| flat/hier | analytic hier ms | analytic flat ms | hier/analytic | flat/analytic |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        h, f = r["hier"], r["flat"]
        lines.append(
            f"| {r['case']} | {r['stream']} | {r['cache']} | {r['flat_home']} | {cell(h)} "
            f"| {cell(f)} | **{r['flat_over_hier']:.2f}x** | {h['analytic_mean_ms']:.1f} "
            f"| {f['analytic_mean_ms']:.1f} | {ratio(h['measured_over_analytic'])} "
            f"| {ratio(f['measured_over_analytic'])} |"
        )
    return "\n".join(lines)


def e2e_table(e2e: dict[str, Any]) -> str:
    t = e2e["ttft"]
    return (
        f"| e2e | requests | hier TTFT ms | flat TTFT ms | no-memory TTFT ms | flat/hier "
        f"| memory part flat/hier |\n{'|---' * 7}|\n| {e2e['mode']} | {t['hier']['n']} "
        f"| {cell(t['hier'])} | {cell(t['flat'])} | {cell(t['off'])} "
        f"| **{e2e['flat_over_hier']:.2f}x** | {ratio(e2e['memory_part_flat_over_hier'])} |"
    )


def goals(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, on every emulated case, flat bank on the external disk."""
    out = []
    for c in (c for c in cases if CASES[c["case"]].emulated):
        rows = [r for r in c["rows"] if r["flat_home"] == "disk"]
        cold = next(r["flat_over_hier"] for r in rows if r["cache"] == "cold")
        warm = [r["flat_over_hier"] for r in rows if r["cache"] == "warm"]
        fit = max(r[s]["measured_over_analytic"] or 0 for r in rows for s in ("hier", "flat"))
        checks = [
            (f"measured <= {GOAL_ANALYTIC:g}x analytic", fit, fit <= GOAL_ANALYTIC),
            (f"warm flat/hier > cold ({cold:.2f}x), every stream", min(warm), min(warm) > cold),
        ]
        if not CASES[c["case"]].one_disk:  # on one disk both banks read the same bytes cold
            checks.insert(0, (f"cold flat/hier >= {GOAL_COLD:g}x", cold, cold >= GOAL_COLD))
        out += [{"case": c["case"], "goal": g, "value": x, "met": ok} for g, x, ok in checks]
    return out


def plot(cases: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "latency.png", out / "latency-levels.png"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.8), squeeze=False)
    for ax, c in zip(axes[0], cases, strict=True):  # distributions: hier and flat box per row
        data = [
            [max(x, 1e-3) for x in r[s]["samples_ms"]] for r in c["rows"] for s in ("hier", "flat")
        ]
        box = ax.boxplot(data, patch_artist=True, widths=0.6)
        for i, patch in enumerate(box["boxes"]):
            patch.set_facecolor("#fc8d62" if i % 2 else "#66c2a5")
        marks = [max(r[s]["analytic_mean_ms"], 1e-3) for r in c["rows"] for s in ("hier", "flat")]
        ax.scatter(
            range(1, len(marks) + 1),
            marks,
            marker="x",
            color="black",
            zorder=3,
            label="analytic (mean)",
        )
        ticks = [
            f"{r['cache']}\n{r['stream']}" + ("\nflat@cloud" if r["flat_home"] == "cloud" else "")
            for r in c["rows"]
        ]
        ax.set_xticks([2 * i + 1.5 for i in range(len(ticks))], ticks, fontsize=7)
        ax.set(yscale="log", ylabel="fetch time per prompt (ms, log)")
        ax.set_title(f"{c['case']}: hier (green) vs flat (orange)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, c in zip(axes[0], cases, strict=True):  # cold: one block's load per level and tier
        bars = [(f"hier L{x['level']}\n{x['tier']}", x) for x in c["per_level"]["hier"]]
        bars += [(f"flat\n{v[5:]}", lv[0]) for v, lv in c["per_level"].items() if v != "hier"]
        xs = range(len(bars))
        legend = (
            ("measured_ms", "measured", "#8da0cb"),
            ("analytic_ms", "analytic, alone", "#ccc"),
        )
        for dx, (key, label, color) in zip((-0.2, 0.2), legend, strict=True):
            ax.bar([x + dx for x in xs], [b[key] for _, b in bars], 0.4, label=label, color=color)
        ax.set_xticks(list(xs), [name for name, _ in bars], fontsize=7)
        ax.set(yscale="log", ylabel="one block's load, cold (ms, log)")
        ax.set_title(f"{c['case']}: time per level and tier", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
