"""Smoke test of bench.cluster in quick mode: it generates a tiny bank into LMDB and an on-disk
S3 server, deploys hmem on a local Ray Serve with two engine replicas, once with residency
routing and once with Ray's default, sends both workloads to each, and reports both side by
side. Its outputs must have the right shape and sane values; whether a goal is met is not
checked (the quick bank and a few dozen requests say nothing about it; docs/results.md has the
full run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROUTINGS = {"residency", "ray"}


@pytest.mark.slow
def test_quick_run_reports_both_routings_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "residency / ray: RAM hit rate" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    assert result["replicas"] == 2
    assert set(result["workloads"]) == {"zipf", "cities"}
    for name, w in result["workloads"].items():
        ws = w["working_set"]
        assert ws["blocks"] == sum(ws["per_level"].values()) > 0
        assert w["ram_cache"] == ws["bytes"] // 2  # the working set / N
        assert [r["routing"] for r in w["runs"]] == ["residency", "ray"]
        assert set(w["pooled"]) == ROUTINGS
        for run in w["runs"]:
            st = run["stats"]
            assert st["requests"] == w["measured"] == 40, name
            assert st["errors"] == 0, st["error_examples"]
            assert st["path_mismatches"] == 0  # the server used the path the bench expected
            assert len(run["ttft_ms"]) == st["requests"]
            # Every request used a block of each of the 3 levels.
            assert st["blocks"] == 3 * st["requests"]
            assert 0.0 <= st["ram_hit_rate"] <= 1.0
            assert all(0.0 <= lv["ram_hit_rate"] <= 1.0 for lv in st["levels"].values())
            assert 0.0 < st["ttft_ms"]["p50"] <= st["ttft_ms"]["p99"] < 60_000
            assert sum(st["replica_requests"].values()) == st["requests"]
            assert len(st["replica_requests"]) <= 2
            assert math.isclose(sum(st["replica_shares"]), 1.0)
            assert 0.5 <= st["subtree_affinity"] <= 1.0
        # Ray's routing never asks where a path is held; residency routing always does.
        placed = {r["routing"]: r["placed"] for r in w["runs"]}
        assert set(placed["ray"]) == {"any"}
        assert set(placed["residency"]) <= {"resident", "home", "spill", "other"}
        total = w["warmup"] + w["measured"]
        assert sum(placed["residency"].values()) == total
        c = w["comparison"]
        assert c["hit_rate_ratio"] > 0
        assert c["ttft_p99_ratio"] > 0
        assert isinstance(c["goal"]["hit_rate_met"], bool)
    assert (out / "results.md").read_text().count("residency / ray:") == 2
