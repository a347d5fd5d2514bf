"""The figures of bench.cluster: per run and pooled per routing, the ratios of residency
routing to Ray's default, and the markdown table printed at the end.

Hit rate is over every block the measured requests used (level by level, from the `memory`
object of each response's first chunk): cached (the replica's RAM cache held it) over all. A
level that fell back (degraded) counts as a miss; with the bench's deadline none should.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.cluster.load import Sample
from bench.common.stats import pct

GOAL_HIT_RATIO = 1.5  # residency / ray, at least
GOAL_P99_RATIO = 1.0  # residency / ray, below


def short(replica: str | None) -> str:
    """`SERVE_REPLICA::hmem#EngineReplica#z4zebu3y` -> `z4zebu3y`."""
    return (replica or "?").rsplit("#", 1)[-1]


def stats(
    samples: Sequence[Sample],
    *,
    levels: int,
    block_bytes: dict[int, int],
    replicas: int,
    seconds: float,
) -> dict[str, Any]:
    """Hit rates, TTFT and where the requests went, over the `samples` of one run."""
    ok = [s for s in samples if s.error is None and s.memory is not None]
    per_level = {lv: {"blocks": 0, "cached": 0} for lv in range(1, levels + 1)}
    degraded = 0
    for s in ok:
        assert s.memory is not None
        for b in s.memory["blocks"]:
            per_level[b["level"]]["blocks"] += 1
            per_level[b["level"]]["cached"] += bool(b["cached"])
        for d in s.memory.get("degraded") or []:
            per_level[d["level"]]["blocks"] += 1
            degraded += 1
    blocks = sum(v["blocks"] for v in per_level.values())
    cached = sum(v["cached"] for v in per_level.values())
    nbytes = sum(v["blocks"] * block_bytes[lv] for lv, v in per_level.items())
    cached_bytes = sum(v["cached"] * block_bytes[lv] for lv, v in per_level.items())
    ttft = [s.ttft_s * 1e3 for s in ok if s.ttft_s == s.ttft_s]
    total = [s.total_s * 1e3 for s in ok]
    split: dict[str, list[float]] = {"all_cached": [], "any_miss": []}
    for s in ok:
        assert s.memory is not None
        hit = all(b["cached"] for b in s.memory["blocks"]) and not s.memory.get("degraded")
        if s.ttft_s == s.ttft_s:
            split["all_cached" if hit else "any_miss"].append(s.ttft_s * 1e3)
    by_replica = Counter(short(s.replica) for s in ok)
    by_subtree: dict[int, Counter[str]] = {}
    for s in ok:
        by_subtree.setdefault(s.path[0], Counter())[short(s.replica)] += 1
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_examples": [s.error for s in samples if s.error is not None][:3],
        "degraded_levels": degraded,
        "path_mismatches": sum(
            1 for s in ok if s.memory is not None and tuple(s.memory["path"]) != s.path
        ),
        "blocks": blocks,
        "ram_hit_rate": cached / blocks if blocks else float("nan"),
        "ram_byte_hit_rate": cached_bytes / nbytes if nbytes else float("nan"),
        "levels": {
            lv: v | {"ram_hit_rate": v["cached"] / v["blocks"] if v["blocks"] else float("nan")}
            for lv, v in per_level.items()
        },
        "ttft_ms": {
            "p50": pct(ttft, 50),
            "p90": pct(ttft, 90),
            "p99": pct(ttft, 99),
            "mean": float(np.mean(ttft)) if ttft else float("nan"),
        },
        # What a miss costs the client: requests whose every block was in RAM against the rest.
        "ttft_ms_by_cache": {
            k: {"requests": len(v), "p50": pct(v, 50), "p99": pct(v, 99)} for k, v in split.items()
        },
        "total_ms": {"p50": pct(total, 50), "p99": pct(total, 99)},
        "seconds": seconds,
        "requests_per_s": len(samples) / seconds if seconds else float("nan"),
        "replica_requests": dict(by_replica.most_common()),
        # Busiest first, a replica that served nothing as 0.
        "replica_shares": [n / len(ok) for _, n in by_replica.most_common()]
        + [0.0] * (replicas - len(by_replica))
        if ok
        else [],
        # Of each subtree's requests, the share its busiest replica served, over all requests:
        # 1.0 when every subtree stays on one replica, about 1/N when they go anywhere.
        "subtree_affinity": sum(max(c.values()) for c in by_subtree.values()) / len(ok)
        if ok
        else float("nan"),
        "subtree_replicas": {str(k): dict(v.most_common()) for k, v in sorted(by_subtree.items())},
    }


def pooled(runs: Sequence[dict[str, Any]], samples: Sequence[Sample], **kw: Any) -> dict[str, Any]:
    """`stats` over the samples of several runs of one routing. Replicas are new in every run,
    so their shares and the subtree affinity are the means of the runs' own."""
    out = stats(samples, **kw)
    per_run = [r["stats"] for r in runs]
    for key in ("replica_requests", "subtree_replicas", "error_examples"):
        out.pop(key)
    shares = [p["replica_shares"] for p in per_run if p["replica_shares"]]
    out["replica_shares"] = [float(x) for x in np.mean(shares, 0)] if shares else []
    out["subtree_affinity"] = float(np.mean([p["subtree_affinity"] for p in per_run]))
    out["runs"] = len(per_run)
    return out


def compare(pooled: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Residency against ray: the ratios and the goal (hit rate >= 1.5x, p99 TTFT lower)."""
    res, ray = pooled["residency"], pooled["ray"]
    hit = res["ram_hit_rate"] / ray["ram_hit_rate"] if ray["ram_hit_rate"] else float("inf")
    p99 = res["ttft_ms"]["p99"] / ray["ttft_ms"]["p99"]
    p50 = res["ttft_ms"]["p50"] / ray["ttft_ms"]["p50"]
    return {
        "hit_rate_ratio": hit,
        "byte_hit_rate_ratio": res["ram_byte_hit_rate"] / ray["ram_byte_hit_rate"]
        if ray["ram_byte_hit_rate"]
        else float("inf"),
        "ttft_p50_ratio": p50,
        "ttft_p99_ratio": p99,
        "goal": {
            "hit_rate_ratio_min": GOAL_HIT_RATIO,
            "ttft_p99_ratio_below": GOAL_P99_RATIO,
            "hit_rate_met": hit >= GOAL_HIT_RATIO,
            "ttft_p99_met": p99 < GOAL_P99_RATIO,
        },
    }


def _shares(xs: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in xs)


def _levels(st: dict[str, Any]) -> str:
    return " / ".join(f"{v['ram_hit_rate']:.2f}" for v in st["levels"].values())


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def markdown(result: dict[str, Any]) -> str:
    """The table printed to stdout: per workload, each run, each routing pooled, the ratios."""
    lines = []
    for name, w in result["workloads"].items():
        ws, ref = w["working_set"], w["reference"]
        per_level = " / ".join(str(n) for n in ws["per_level"].values())
        level_names = " / ".join(f"L{lv}" for lv in ws["per_level"])
        lines += [
            "",
            f"### workload {name}: {w['description']}",
            "",
            f"working set {ws['blocks']} blocks ({per_level} per level), "
            f"{ws['bytes'] / 1e6:.1f} MB; RAM cache {w['ram_cache'] / 1e6:.1f} MB per replica x "
            f"{result['replicas']} replicas; {w['warmup']} warm-up + {w['measured']} measured "
            f"requests, {result['args']['concurrency']} in flight, spill "
            f"{result['args'].get('spill', 4)}",
            "",
            f"| routing | run | RAM hit rate | {level_names} | byte hit rate | TTFT p50 ms "
            "| TTFT p99 ms | req/s | replica shares | subtree affinity | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        rows = [(r["routing"], f"#{r['round']} ({r['order']})", r["stats"]) for r in w["runs"]]
        rows += [(routing, "**pooled**", st) for routing, st in w["pooled"].items()]
        for routing, run, st in rows:
            lines.append(
                f"| {routing} | {run} | {st['ram_hit_rate']:.3f} | {_levels(st)} | "
                f"{st['ram_byte_hit_rate']:.3f} | {st['ttft_ms']['p50']:.1f} | "
                f"{st['ttft_ms']['p99']:.1f} | {st['requests_per_s']:.1f} | "
                f"{_shares(st['replica_shares'])} | {st['subtree_affinity']:.2f} | "
                f"{st['errors'] + st['degraded_levels']} |"
            )
        c, g = w["comparison"], w["comparison"]["goal"]
        lines += [
            "",
            f"residency / ray: RAM hit rate {c['hit_rate_ratio']:.2f}x (goal >= "
            f"{g['hit_rate_ratio_min']}x: {_verdict(g['hit_rate_met'])}), byte hit rate "
            f"{c['byte_hit_rate_ratio']:.2f}x, TTFT p50 {c['ttft_p50_ratio']:.2f}x, TTFT p99 "
            f"{c['ttft_p99_ratio']:.2f}x (goal < {g['ttft_p99_ratio_below']}x: "
            f"{_verdict(g['ttft_p99_met'])})",
            f"replayed offline, LRU caches of the same size: one unbounded cache (no routing "
            f"beats it) {ref['ceiling']:.3f}, random routing {ref['lru_random']:.3f}, subtree "
            f"homes {ref['lru_subtree_home']:.3f}; ceiling / random "
            f"{ref['max_hit_rate_ratio']:.2f}x",
        ]
        for routing, st in w["pooled"].items():
            by = st["ttft_ms_by_cache"]
            lines.append(
                f"{routing}: TTFT p50 / p99 {by['all_cached']['p50']:.1f} / "
                f"{by['all_cached']['p99']:.1f} ms with every block in RAM "
                f"({by['all_cached']['requests']} requests), {by['any_miss']['p50']:.1f} / "
                f"{by['any_miss']['p99']:.1f} ms with a miss ({by['any_miss']['requests']})"
            )
        last = next((r for r in reversed(w["runs"]) if r["routing"] == "residency"), None)
        if last is not None and last.get("placed"):
            how = ", ".join(f"{k} {int(v)}" for k, v in sorted(last["placed"].items()))
            lines.append(f"residency placements, last run (warm-up included): {how}")
    return "\n".join(lines) + "\n"
