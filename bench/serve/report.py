"""The report of bench.serve: every comparison as a row against its goal, the markdown table
printed at the end, and the plot (ratios against goals, TTFT samples, decode rates against
Hugging Face `transformers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GOALS: dict[str, tuple[str, float]] = {
    "ttft": ("<=", 1.15),
    "ttft_path": ("<=", 1.15),
    "decode": (">=", 0.85),
    "concurrent": (">=", 3.0),
    "hf_http": (">", 1.0),
    "hf_engine": (">", 1.0),
    "hf_loop": (">", 1.0),
}


def row(key: str, name: str, a: str, b: str, ratio: float) -> dict[str, Any]:
    op, goal = GOALS[key]
    met = {"<=": ratio <= goal, ">=": ratio >= goal, ">": ratio > goal}[op]
    cells = {"case": key, "name": name, "a": a, "b": b, "ratio": ratio}
    return cells | {"goal": f"{op} {goal:g}x", "goal_op": op, "goal_value": goal, "met": met}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def tps(rate: float) -> str:
    return f"{rate:,.0f} tok/s"


def rows_of(result: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
    t, d, cc = result["ttft"], result["decode"], result["concurrent"]
    path = t["medians"]["path"]
    streams = f"{cc['streams']} streams, distinct paths"
    out = [
        row(
            "ttft",
            "1. TTFT: memory, routed, warm (A) vs anchor-only (B)",
            ms(t["a"]),
            ms(t["b"]),
            t["ratio"],
        ),
        row(
            "ttft_path",
            "1b. TTFT: memory, explicit path, no routing (A) vs anchor-only (B)",
            ms(path),
            ms(t["b"]),
            path / t["b"],
        ),
        row(
            "decode",
            f"2. decode, 1 stream, {max_tokens} tokens: memory (A) vs anchor-only (B)",
            tps(d["a"]),
            tps(d["b"]),
            d["ratio"],
        ),
        row(
            "concurrent",
            f"3. aggregate, {streams}: concurrent (A) vs one at a time (B)",
            tps(cc["a"]),
            tps(cc["b"]),
            cc["ratio"],
        ),
    ]
    if "hf" in result:
        r = result["hf"]["rates"]
        for key, name in (
            ("http", "server over HTTP/SSE"),
            ("engine", "engine in-process, no HTTP"),
            ("loop", "greedy_decode loop, no engine"),
        ):
            label = f"4. anchor-only decode, 1 stream: hmem {name} (A) vs HF generate (B)"
            out.append(row(f"hf_{key}", label, tps(r[key]), tps(r["hf"]), r[key] / r["hf"]))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | measured A | measured B | ratio A/B | goal | met? |", "|---" * 6 + "|"]
    for r in rows:
        met = "met" if r["met"] else "**missed**"
        lines.append(
            f"| {r['name']} | {r['a']} | {r['b']} | {r['ratio']:.2f}x | {r['goal']} | {met} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = 3 if "hf" in result else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.6))
    ax = axes[0]
    labels = [r["case"] for r in rows]
    colors = ["#66c2a5" if r["met"] else "#fc8d62" for r in rows]
    bars = ax.bar(range(len(rows)), [r["ratio"] for r in rows], color=colors)
    ax.bar_label(bars, labels=[f"{r['ratio']:.2f}" for r in rows], fontsize=8, padding=1)
    for i, r in enumerate(rows):
        ax.hlines(r["goal_value"], i - 0.4, i + 0.4, colors="black", linestyles="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_yticks([0.5, 0.75, 1, 1.5, 2, 3, 5])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ratio A/B (log); dashed: goal")
    ax.set_title("ratios against goals (green: met)")
    ax.grid(axis="y", which="both", alpha=0.3)

    ax = axes[1]
    ttft = result["ttft"]["samples"]
    ax.boxplot([[x * 1e3 for x in ttft[k]] for k in ("auto", "path", "off")], showfliers=False)
    ax.set_xticks([1, 2, 3], ["memory, routed\n(warm)", "memory,\nexplicit path", "anchor-only"])
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("time to first token over HTTP/SSE")
    ax.grid(axis="y", alpha=0.3)

    if "hf" in result:
        ax = axes[2]
        r = result["hf"]["rates"]
        names = ["server HTTP", "engine", "greedy loop", "HF generate"]
        values = [r["http"], r["engine"], r["loop"], r["hf"]]
        bars = ax.bar(names, values, color=["#8da0cb", "#8da0cb", "#8da0cb", "#e78ac3"])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=1)
        ax.set_ylabel("decode tokens/s (anchor-only, 1 stream)")
        ax.set_title("hmem vs Hugging Face transformers")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
