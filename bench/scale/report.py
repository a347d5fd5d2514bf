"""The table, goal verdicts and plot of bench.scale."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from server.bank.shapes import size

# name -> (how the figure is read, goal, "max" or "min")
GOALS: dict[str, tuple[str, float, str]] = {
    "anon RSS / (anchor + cache budget)": ("x", 1.2, "max"),
    "cold path fetch / analytic limit": ("x", 1.1, "max"),
    "TTFT memory / anchor alone": ("x", 1.10, "max"),
    "decode memory / anchor alone": ("x", 0.90, "min"),
    "N streams / one": ("x", 3.0, "min"),
    "HTTP decode / transformers": ("x", 1.2, "min"),
}


def figures(r: dict[str, Any]) -> dict[str, float]:
    mem = r["memory"]
    out = {
        "anon RSS / (anchor + cache budget)": mem["peak_anon"]
        / (mem["anchor_bytes"] + mem["ram_cache"]),
        "cold path fetch / analytic limit": statistics.median(r["cold"]["served_s"])
        / r["cold"]["limit_s"],
        "TTFT memory / anchor alone": r["serving"]["ttft"]["ratio"],
        "decode memory / anchor alone": r["serving"]["decode"]["ratio"],
        "N streams / one": r["streams"]["ratio"],
    }
    if "hf" in r:
        out["HTTP decode / transformers"] = r["hf"]["ratio"]
    return out


def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, value in figures(r).items():
        _, goal, kind = GOALS[name]
        met = value <= goal if kind == "max" else value >= goal
        out[name] = {"value": value, "goal": goal, "kind": kind, "met": met}
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def markdown(r: dict[str, Any]) -> str:
    b, mem, w = r["bank"], r["memory"], r["workload"]
    lines = [
        f"bank {b['id']}: {b['levels']} levels x {b['branching']}, widths {b['widths']}, "
        f"{_gb(b['bank_bytes'])}, one path {b['path_bytes'] / 1e6:.1f} MB; machine "
        f"{r['machine']['cpu']}, {r['machine']['cores']} cores",
        "",
        "| figure | measured | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, v in r["verdicts"].items():
        sign = "<=" if v["kind"] == "max" else ">="
        lines.append(
            f"| {name} | {v['value']:.2f}x | {sign} {v['goal']}x | "
            f"{'yes' if v['met'] else '**no**'} |"
        )
    end = mem["end"]
    lines += [
        "",
        f"memory: peak anonymous RSS {_gb(mem['peak_anon'])} against anchor "
        f"{_gb(mem['anchor_bytes'])} + RAM cache budget {_gb(mem['ram_cache'])}; peak file-backed "
        f"RSS {_gb(mem['peak_file'])}; at the end anon {_gb(end['RssAnon'])}, file "
        f"{_gb(end['RssFile'])}",
        "",
        f"cache filled first: {r['fill']['prefetched_paths']} paths prefetched in "
        f"{r['fill']['seconds']:.0f} s until it evicted; at the end it held "
        f"{_gb(r['cache_end']['bytes'])} of {_gb(r['cache_end']['capacity'])}, "
        f"{_gb(r['cache_end']['evicted'])} evicted",
        "",
        f"Zipf workload: {w['requests']} requests in {w['seconds']:.1f} s, "
        f"RAM hit rate {w['ram_hit_rate']:.1%} over all levels",
        "",
        "| level | block | fetches | RAM hit rate | miss p50 | miss p99 | all p50 | all p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level, s in w["levels"].items():
        size = b["level_block_bytes"][level] if level in b["level_block_bytes"] else float("nan")
        lines.append(
            f"| L{level} | {size / 1e6:.2f} MB | {s['fetches']} | {s['ram_hit_rate']:.1%} | "
            f"{s['miss_p50_ms']:.1f} ms | {s['miss_p99_ms']:.1f} ms | {s['all_p50_ms']:.2f} ms | "
            f"{s['all_p99_ms']:.1f} ms |"
        )
    cold = r["cold"]
    raw = ", ".join(
        f"L{lvl} {statistics.median(ts) * 1e3:.1f} ms" for lvl, ts in sorted(cold["raw_s"].items())
    )
    tiers_on = {
        dev: "+".join(t for t, d in cold["devices"].items() if d == dev)
        for dev in cold["per_device_s"]
    }
    tiers = ", ".join(
        f"{tiers_on[dev]} ({dev}) {s * 1e3:.1f} ms" for dev, s in cold["per_device_s"].items()
    )
    lines += [
        "",
        f"cold path: median cold raw read per level {raw}; per device (levels in turn) {tiers}; "
        f"analytic limit {cold['limit_s'] * 1e3:.1f} ms; served cold paths median "
        f"{statistics.median(cold['served_s']) * 1e3:.1f} ms "
        f"({', '.join(f'{s * 1e3:.0f}' for s in cold['served_s'])} ms)",
    ]
    s = r["serving"]
    lines += [
        "",
        f"TTFT: memory {s['ttft']['a'] * 1e3:.1f} ms, anchor alone {s['ttft']['b'] * 1e3:.1f} ms; "
        f"decode: memory {s['decode']['a']:.1f} tok/s, anchor alone {s['decode']['b']:.1f} tok/s; "
        f"streams: together {r['streams']['a']:.1f} tok/s, one at a time {r['streams']['b']:.1f} "
        "tok/s",
    ]
    if "hf" in r:
        h = r["hf"]
        lines.append(
            f"HTTP decode {h['a']:.1f} tok/s, transformers {h['b']:.1f} tok/s "
            f"({h['torch_threads']} torch threads); greedy text agreement: first "
            f"{h['greedy_agreement_chars']['common_prefix']} characters"
        )
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
    v = r["verdicts"]
    names = list(v)
    colors = ["tab:green" if v[n]["met"] else "tab:red" for n in names]
    ax1.barh(names, [v[n]["value"] for n in names], color=colors)
    for i, n in enumerate(names):
        ax1.plot([v[n]["goal"]] * 2, [i - 0.4, i + 0.4], color="black")
    if max(v[n]["value"] for n in names) > 10:  # the quick shape's ratios mean nothing
        ax1.set_xscale("log")
    ax1.set_xlabel("measured ratio (black line: goal; green met, red missed)")
    ax1.invert_yaxis()
    levels = r["workload"]["levels"]
    lv = list(levels)
    ax2.bar([f"L{x}" for x in lv], [levels[x]["ram_hit_rate"] for x in lv], color="tab:blue")
    ax2.set_ylabel("RAM hit rate (Zipf workload)")
    ax2.set_ylim(0, 1)
    for i, x in enumerate(lv):
        p50, p99 = levels[x]["miss_p50_ms"], levels[x]["miss_p99_ms"]
        ax2.text(i, 0.02, f"miss p50 {p50:.0f} ms\np99 {p99:.0f} ms", ha="center", fontsize=8)
    mem = r["memory"]
    times = [t for t, _ in mem["samples"]]
    ax3.plot(times, [a / 1e9 for _, a in mem["samples"]], label="anonymous RSS")
    budget = (mem["anchor_bytes"] + mem["ram_cache"]) / 1e9
    ax3.axhline(budget, color="black", label="anchor + cache budget")
    ax3.axhline(1.2 * budget, color="tab:red", linestyle="--", label="1.2x (goal)")
    ax3.set_xlabel("seconds since the server answered")
    ax3.set_ylabel("GB")
    ax3.legend(fontsize=8)
    fig.suptitle(
        f"hmem serving bank {r['bank']['id']} ({size(r['bank']['bank_bytes'])}) from its tiers"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
