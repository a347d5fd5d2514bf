"""The report of bench.soak: requests by kind and status, each fault and its recovery, and the
goals (no 5xx, no corrupt bytes applied, every corrupt copy repaired, RSS), as markdown tables
and one JSON object.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from bench.soak.faults import Fault
from bench.soak.load import KIND_WEIGHTS, Outcome

CLIENT_FAILURES = ("timeout", "conn_error", "bad_response")


def _status_order(status: str) -> tuple[int, str]:
    return (int(status), "") if status.isdigit() else (1000, status)


def is_5xx(status: str) -> bool:
    return status.isdigit() and int(status) >= 500


def window_of(t: float, faults: Sequence[Fault]) -> int | None:
    """The index of the fault whose window (start to the end of its recovery) holds `t`."""
    for i, f in enumerate(faults):
        if f.start <= t <= (f.window_end or f.end or f.start):
            return i
    return None


def requests(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts by kind and status, answers checked against the baselines, stream errors."""
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in KIND_WEIGHTS}
    checks: dict[str, Counter[str]] = {k: Counter() for k in KIND_WEIGHTS}
    stream_errors: Counter[str] = Counter()
    malformed: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: dict[str, list[float]] = {k: [] for k in KIND_WEIGHTS}
    for o in outcomes:
        by_kind[o.kind][o.status] += 1
        seconds[o.kind].append(o.seconds)
        if o.check:
            checks[o.kind][o.check] += 1
        if o.stream_error and o.status == "200":
            stream_errors[o.kind] += 1
        if o.variant is not None:
            malformed[o.variant][o.status] += 1
    statuses = sorted({s for c in by_kind.values() for s in c}, key=_status_order)
    return {
        "statuses": statuses,
        "by_kind": {k: dict(c) for k, c in by_kind.items()},
        "checks": {k: dict(c) for k, c in checks.items()},
        "stream_errors": dict(stream_errors),
        "malformed": {v: dict(c) for v, c in sorted(malformed.items())},
        "seconds": {k: _percentiles(s) for k, s in seconds.items()},
    }


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)
    at = {"p50": 0.5, "p99": 0.99}
    return {name: round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) for name, q in at.items()} | {
        "max": round(xs[-1], 4)
    }


def by_window(outcomes: Sequence[Outcome], faults: Sequence[Fault]) -> dict[str, Any]:
    """Per fault window (and outside any, `calm`): the answers with a `memory` object, the
    `memory.degraded` reasons seen (`L<level>:<reason>`), and which tier served the fault's level
    (`none` when it did not come). Every fault that ran has its window here, with 0 answers when
    none landed in it: a corruption repaired at the first read can close its window in a few
    tenths of a second, before any load request finishes."""
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    served: dict[str, Counter[str]] = defaultdict(Counter)
    answered: Counter[str] = Counter({str(i): 0 for i, f in enumerate(faults) if not f.skipped})
    for o in outcomes:
        if o.memory is None:
            continue
        i = window_of(o.t, faults)
        where = "calm" if i is None else str(i)
        answered[where] += 1
        for d in o.memory.get("degraded") or ():
            seen[where][f"L{d['level']}:{d['reason']}"] += 1
        if i is not None:
            f = faults[i]
            for b in o.memory.get("blocks") or ():
                if b["level"] == f.level and f.node in (None, b["node"]):
                    served[where][b.get("tier") or "none"] += 1
    return {
        w: {"answers": n, "degraded": dict(seen[w]), "served_by": dict(served[w])}
        for w, n in answered.items()
    }


def degraded_events(
    outcomes: Sequence[Outcome], faults: Sequence[Fault], *, limit: int = 200
) -> list[dict[str, Any]]:
    """The first `limit` answers with a degraded level: when, which request, in which window."""
    events: list[dict[str, Any]] = []
    for o in outcomes:
        if o.memory and o.memory.get("degraded") and len(events) < limit:
            i = window_of(o.t, faults)
            events.append(
                {"t": round(o.t, 2), "kind": o.kind, "window": "calm" if i is None else i}
                | {"seconds": round(o.seconds, 3), "degraded": o.memory["degraded"]}
            )
    return events


def goals(
    req: dict[str, Any],
    faults: Sequence[Fault],
    *,
    still_corrupt: int,
    verify_ok: bool,
    rss_kib: tuple[int | None, int | None],
    active_at_end: int | None,
) -> list[dict[str, Any]]:
    """One row per goal: what was measured, the goal, met or not."""
    n5xx = sum(n for c in req["by_kind"].values() for s, n in c.items() if is_5xx(s))
    client = sum(n for c in req["by_kind"].values() for s, n in c.items() if s in CLIENT_FAILURES)
    checks = Counter[str]()
    for c in req["checks"].values():
        checks.update(c)
    checked = checks["match"] + checks["mismatch"]
    bad_malformed = sum(
        n for c in req["malformed"].values() for s, n in c.items() if not s.startswith("4")
    )
    injected = sum(1 for f in faults if f.kind.startswith("corrupt") and f.skipped is None)
    stream_errors = sum(req["stream_errors"].values())
    start, end = rss_kib
    growth, rss = None, "?"
    if start and end:
        growth = (end - start) / start
        rss = f"{start / 1024:.0f} -> {end / 1024:.0f} MiB ({growth:+.0%})"
    return [
        {"goal": "no 5xx", "value": n5xx, "target": "0", "met": n5xx == 0},
        {"goal": "no error events in 200 streams", "value": stream_errors, "target": "0"}
        | {"met": stream_errors == 0},
        {"goal": "no client timeouts or broken connections", "value": client, "target": "0"}
        | {"met": client == 0},
        {"goal": "malformed requests answered 4xx", "value": bad_malformed, "target": "0 not 4xx"}
        | {"met": bad_malformed == 0},
        {
            "goal": "no corrupt bytes applied (clean answers = baseline)",
            "value": f"{checks['mismatch']} mismatches / {checked} checked",
            "target": "0 mismatches",
            "met": checks["mismatch"] == 0 and checked > 0,
        },
        {
            "goal": "every corrupt copy repaired by the end",
            "value": f"{still_corrupt} still corrupt / {injected} injected",
            "target": "0 still corrupt",
            "met": still_corrupt == 0 and verify_ok,
        },
        {
            "goal": "every fault recovered (level served by its home tier again)",
            "value": f"{sum(f.recovered_s is not None for f in faults)} / "
            f"{sum(f.skipped is None for f in faults)}",
            "target": "all",
            "met": all(f.recovered_s is not None for f in faults if f.skipped is None),
        },
        {
            "goal": "server RSS start -> end",
            "value": rss,
            "target": "< +25%",
            "met": growth is not None and growth < 0.25,
        },
        {"goal": "engine sequences active at the end", "value": active_at_end, "target": "0"}
        | {"met": active_at_end == 0},
    ]


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def request_table(req: dict[str, Any]) -> str:
    statuses = req["statuses"]
    head = ["kind", "total", *statuses, "checked", "mismatch", "degraded (unchecked)"]
    head.append("p50 / p99 / max s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, counts in req["by_kind"].items():
        chk = req["checks"][kind]
        checked = chk.get("match", 0) + chk.get("mismatch", 0)
        cells = [kind, str(sum(counts.values())), *(str(counts.get(s, 0)) for s in statuses)]
        lines.append("| " + " | ".join([*cells, str(checked), str(chk.get("mismatch", 0))]))
        s = req["seconds"][kind]
        times = f"{s['p50']:.3f} / {s['p99']:.3f} / {s['max']:.2f}" if s else ""
        lines[-1] += f" | {chk.get('degraded', 0)} | {times} |"
    return "\n".join(lines)


def fault_table(faults: Sequence[Fault], windows: dict[str, Any]) -> str:
    head = "| # | fault | target | start s | end s | level served by (window) | "
    head += "recovered s (home tier) | copy verified s | degraded in window |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for i, f in enumerate(faults):
        if f.skipped:
            lines.append(f"| {i} | {f.kind} | skipped: {f.skipped} | | | | | | |")
            continue
        w = windows.get(str(i), {})
        served = ", ".join(f"{k} {n}" for k, n in sorted(w.get("served_by", {}).items()))
        served = f"L{f.level}: {served or 'no answers'}"
        rec = "**never**" if f.recovered_s is None else f"{f.recovered_s:.2f}"
        ver = "" if not f.kind.startswith("corrupt") else "**never**"
        if f.verified_s is not None:
            ver = f"{f.verified_s:.2f}"
        reasons = ", ".join(f"{k} {n}" for k, n in sorted(w.get("degraded", {}).items()))
        end = "" if f.end is None else f"{f.end:.1f}"
        cells = [str(i), f.kind, f.target, f"{f.start:.1f}", end, served, rec, ver]
        lines.append("| " + " | ".join([*cells, reasons or "none"]) + " |")
    calm = windows.get("calm", {})
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(calm.get("degraded", {}).items()))
    lines.append(f"| - | (no fault) | | | | | | | {reasons or 'none'} |")
    return "\n".join(lines)


def goal_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| goal | measured | target | met? |", "|---|---|---|---|"]
    lines += [f"| {r['goal']} | {r['value']} | {r['target']} | {_met(r['met'])} |" for r in rows]
    return "\n".join(lines)


def summary_line(rows: Sequence[dict[str, Any]]) -> str:
    by = {r["goal"]: r for r in rows}
    five, mism = by["no 5xx"], by["no corrupt bytes applied (clean answers = baseline)"]
    rep = by["every corrupt copy repaired by the end"]
    return (
        f"summary: 5xx {five['value']} (goal 0: {_met(five['met'])}); "
        f"{mism['value']} ({_met(mism['met'])}); corrupt copies {rep['value']} "
        f"({_met(rep['met'])}); RSS {by['server RSS start -> end']['value']}"
    )
