"""Smoke test of bench.scale in quick mode: it generates the small shape into LMDB, a directory
and an on-disk S3 server, serves it with `hmem serve` in its own process, runs every case, and
its outputs have the right shape. Timings are not checked; the quick shape is too small for its
ratios to mean anything (docs/results.md has the paper-scale run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "anon RSS / (anchor + cache budget)",
    "cold path fetch / analytic limit",
    "TTFT memory / anchor alone",
    "decode memory / anchor alone",
    "N streams / one",
    "HTTP decode / transformers",
)


@pytest.mark.slow
def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = os.environ | {"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for name in FIGURES:
        assert any(row.startswith(f"| {name} |") for row in rows), name

    result = json.loads((out / "scale.json").read_text())
    assert set(result["verdicts"]) == set(FIGURES)
    for v in result["verdicts"].values():
        assert v["value"] > 0
        assert isinstance(v["met"], bool)
    # Every level was fetched by the workload, from the tier the generator put it in.
    levels = result["workload"]["levels"]
    assert sorted(levels) == ["1", "2", "3", "4"]
    assert sum(lv["fetches"] for lv in levels.values()) == 4 * result["workload"]["requests"]
    # The budget is tiny in quick mode, so L1 blocks cannot all stay cached: some misses.
    assert result["workload"]["ram_hit_rate"] < 1.0
    mem = result["memory"]
    assert mem["peak_anon"] > 0
    assert mem["anchor_bytes"] > 0
    assert mem["ram_cache"] == 256 * 1024
    assert len(result["cold"]["served_s"]) == 2
    assert result["cold"]["limit_s"] > 0
    assert result["hf"]["greedy_agreement_chars"]["hf"] > 0
    assert (out / "scale.png").stat().st_size > 10_000
    assert (out / "scale.md").read_text().startswith("bank small:")
