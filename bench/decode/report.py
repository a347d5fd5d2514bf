"""bench.decode's figures, goals and markdown report."""

from __future__ import annotations

from statistics import median
from typing import Any

# The goals: (figure, comparison, bound).
GOALS: dict[str, tuple[str, float]] = {
    "hmem bf16 anchor / its ceiling": (">=", 0.70),
    "hmem int8 anchor / its ceiling": (">=", 0.70),
    "hmem bf16 / llama.cpp f16": (">=", 0.90),
    "hmem int8 / llama.cpp q8_0": (">=", 0.90),
    "hmem bf16 / transformers bf16": (">=", 2.0),
    "bf16: with memory / anchor alone": (">=", 0.90),
    "int8: with memory / anchor alone": (">=", 0.90),
    "int8 bank bytes / bf16 bank bytes": ("<=", 0.52),
    "int8 cold path / bf16 cold path": ("<=", 0.60),
    "int8 - bf16 mean |logprob| (anchor)": ("<=", 0.02),
    "int8 - bf16 mean |logprob| (memory)": ("<=", 0.02),
}


def bandwidth(r: dict[str, Any]) -> float:
    """GB/s: the faster of the reads before and after the run."""
    return float(max(r["bandwidth"]["gb_per_s"], r["bandwidth_end"]["gb_per_s"]))


def rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per engine and width: tokens/s, bytes a step reads, the ceiling, the fraction."""
    bw = bandwidth(r) * 1e9
    q = r["quality"]
    out = []
    for width in ("bf16", "int8"):
        for mem in ("off", "path"):
            nbytes = q["step_bytes"][width] + (
                r["banks"][width]["path_bytes"] if mem == "path" else 0
            )
            out.append({
                "engine": f"hmem HTTP, {width}" + (", a path's memory" if mem == "path" else ""),
                "tokens_per_s": median(r["decode"][f"{width}/{mem}"]),
                "step_bytes": nbytes,
            })  # fmt: skip
    if "hf" in r:
        out.append({
            "engine": "transformers generate, bf16",
            "tokens_per_s": r["hf"]["medians"]["hf"],
            "step_bytes": q["step_bytes"]["bf16"],
        })  # fmt: skip
    llama = r.get("llamacpp", {})
    for kind in ("f16", "bf16", "q8_0"):
        if kind in llama:
            out.append({
                "engine": f"llama.cpp, {kind}",
                "tokens_per_s": median(llama[kind]),
                "step_bytes": q["gguf_step_bytes"][kind],
            })  # fmt: skip
    for row in out:
        row["ceiling"] = bw / row["step_bytes"]
        row["fraction"] = row["tokens_per_s"] / row["ceiling"]
    return out


def figures(r: dict[str, Any]) -> dict[str, float]:
    by = {row["engine"]: row for row in rows(r)}
    tps = {k: v["tokens_per_s"] for k, v in by.items()}
    f = {
        "hmem bf16 anchor / its ceiling": by["hmem HTTP, bf16"]["fraction"],
        "hmem int8 anchor / its ceiling": by["hmem HTTP, int8"]["fraction"],
        "bf16: with memory / anchor alone": tps["hmem HTTP, bf16, a path's memory"]
        / tps["hmem HTTP, bf16"],
        "int8: with memory / anchor alone": tps["hmem HTTP, int8, a path's memory"]
        / tps["hmem HTTP, int8"],
        "int8 bank bytes / bf16 bank bytes": r["banks"]["int8"]["bank_bytes"]
        / r["banks"]["bf16"]["bank_bytes"],
        "int8 cold path / bf16 cold path": median(r["cold_s"]["int8"])
        / median(r["cold_s"]["bf16"]),
        "int8 - bf16 mean |logprob| (anchor)": r["quality"]["anchor"]["mean_abs"],
        "int8 - bf16 mean |logprob| (memory)": r["quality"]["memory"]["mean_abs"],
    }
    if "llama.cpp, f16" in tps:
        f["hmem bf16 / llama.cpp f16"] = tps["hmem HTTP, bf16"] / tps["llama.cpp, f16"]
        f["hmem int8 / llama.cpp q8_0"] = tps["hmem HTTP, int8"] / tps["llama.cpp, q8_0"]
    if "hf" in r:
        f["hmem bf16 / transformers bf16"] = r["hf"]["ratio"]
    return f


def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, value in figures(r).items():
        op, bound = GOALS[name]
        out[name] = {
            "value": value,
            "goal": f"{op} {bound}",
            "met": value >= bound if op == ">=" else value <= bound,
        }
    return out


def markdown(r: dict[str, Any]) -> str:
    bw = r["bandwidth"]
    lines = [
        f"Memory read: {bandwidth(r):.1f} GB/s (best of: "
        + ", ".join(f"{k} {v:.1f}" for k, v in bw.items() if k != "gb_per_s")
        + f"; after the run {r['bandwidth_end']['gb_per_s']:.1f})",
        "",
        "| engine | tokens/s | MB read per token | ceiling tokens/s | fraction of ceiling |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows(r):
        lines.append(
            f"| {row['engine']} | {row['tokens_per_s']:.1f} | {row['step_bytes'] / 1e6:.1f} | "
            f"{row['ceiling']:.1f} | {row['fraction']:.2f} |"
        )
    if "skipped" in r.get("llamacpp", {}):
        lines.append(f"\nllama.cpp: {r['llamacpp']['skipped']}")
    b = r["banks"]
    lines += [
        "",
        "| bank | bf16 | int8 | ratio |",
        "| --- | --- | --- | --- |",
        f"| this run's bank | {b['bf16']['bank_bytes'] / 1e6:.1f} MB | "
        f"{b['int8']['bank_bytes'] / 1e6:.1f} MB | "
        f"{b['int8']['bank_bytes'] / b['bf16']['bank_bytes']:.3f} |",
        f"| the 16-way tree | {b['paper_16way']['bf16']['bank_bytes'] / 1e9:.2f} GB | "
        f"{b['paper_16way']['int8']['bank_bytes'] / 1e9:.2f} GB | "
        f"{b['paper_16way']['int8']['bank_bytes'] / b['paper_16way']['bf16']['bank_bytes']:.3f} |",
        f"| one path | {b['bf16']['path_bytes'] / 1e6:.2f} MB | "
        f"{b['int8']['path_bytes'] / 1e6:.2f} MB | "
        f"{b['int8']['path_bytes'] / b['bf16']['path_bytes']:.3f} |",
        f"| cold path fetch, median | {median(r['cold_s']['bf16']) * 1e3:.0f} ms | "
        f"{median(r['cold_s']['int8']) * 1e3:.0f} ms | "
        f"{median(r['cold_s']['int8']) / median(r['cold_s']['bf16']):.2f} |",
        "",
        "| int8 against bf16, chosen tokens | mean abs logprob | max abs logprob | argmax agrees |",
        "| --- | --- | --- | --- |",
    ]
    for part in ("anchor", "memory"):
        qd = r["quality"][part]
        lines.append(
            f"| {part} ({qd['tokens']} tokens) | {qd['mean_abs']:.4f} | {qd['max_abs']:.4f} | "
            f"{qd['argmax_agreement']:.1%} |"
        )
    lines += ["", "| goal | measured | bound | met |", "| --- | --- | --- | --- |"]
    for name, v in r["verdicts"].items():
        lines.append(
            f"| {name} | {v['value']:.3f} | {v['goal']} | {'yes' if v['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"
