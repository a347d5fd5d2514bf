"""Smoke test of bench.hang in quick mode: it runs end to end against a SIGSTOPped moto server,
prints the table, writes the JSON, and leaves no S3 process behind. Timings are not checked; only
outcomes that do not depend on the machine's speed are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("healthy", "hung", "hung, no replica")


@pytest.mark.slow
def test_quick_run_compares_old_and_new_behaviour_under_a_hung_endpoint(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.hang", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| scenario | behaviour | burst | ok |" in proc.stdout

    report = json.loads((tmp_path / "hang.json").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(report["moto_pid"], 0)  # resumed, killed and reaped
    rows: list[dict[str, Any]] = report["rows"]
    shape = [(r["scenario"], r["behaviour"], r["burst"]) for r in rows]
    expected = [("healthy", b, 1) for b in ("old", "new")]
    expected += [(s, b, n) for s in SCENARIOS[1:] for b in ("old", "new") for n in (1, 2)]
    assert shape == expected
    for r in rows:
        assert r["n"] == report["n"] == 20
        assert sum(r["outcomes"].values()) == r["n"]
        assert 0 <= r["p50_ms"] <= r["p99_ms"]
        assert r["wall_ms"] > 0

    def row(scenario: str, behaviour: str, burst: int) -> dict[str, Any]:
        return rows[shape.index((scenario, behaviour, burst))]

    # Hung with no hedge: every fetch waits out its deadline, and the breaker stays closed.
    assert row("hung", "old", 1)["ok"] == 0
    assert row("hung, no replica", "old", 2)["breakers"]["cloud"] == "closed"
    # Hedged: the replica serves. Deadline misses open the breaker (by the end of the second
    # burst: a deadline noticed late on a starved machine is not counted), not the tier timeout.
    assert row("hung", "new", 1)["hedges_won"] > 0
    assert row("hung, no replica", "new", 2)["breakers"]["cloud"] == "open"
