"""Smoke test of bench.latency in quick mode: real banks through the real store on emulated seed
devices and on this machine's tiers, and two servers in-process for time to first token. It
checks the output's shape (the table's rows and columns, JSON keys and types, the PNGs, the
scaled profiles file), not its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = [("cold", "uniform", "disk"), ("warm", "uniform", "disk"), ("warm", "zipf", "disk")]
ROWS += [("warm", "related", "disk"), ("cold", "uniform", "cloud")]
CASES = ("seed", "real")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_quick_run_reports_every_case_stream_and_cache(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = os.environ | {"HMEM_DATA_DIR": str(tmp_path / "state"), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "bench.latency", "--quick", "--e2e", "--out", str(out)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine:" in proc.stdout
    assert "command: python -m bench.latency --quick --e2e --out " in proc.stdout

    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| case | stream | cache |"))
    assert cells(lines[head])[4:7] == [
        "hier ms: mean (p50, p90)",
        "flat ms: mean (p50, p90)",
        "flat/hier",
    ]
    body = [cells(line) for line in lines[head + 2 : head + 2 + len(CASES) * len(ROWS)]]
    assert [tuple(row[:4]) for row in body] == [(c, s, k, h) for c in CASES for k, s, h in ROWS]
    for row in body:
        assert len(row) == 11
        assert row[6].startswith("**")
        assert row[6].endswith("x**")
        assert all(cell.endswith("x") for cell in row[9:])
    assert any(line.startswith("| in-process | 3 |") for line in lines)
    goals = [line for line in lines if line.startswith("goal [seed]")]
    assert len(goals) == 3
    assert all(line.endswith(("met", "**missed**")) for line in goals)

    report = json.loads((out / "latency.json").read_text())
    assert isinstance(report["machine"]["cores"], int)
    assert report["scale"] > 1
    assert report["banks"]["flat"]["branching"] == 4**3
    assert [c["case"] for c in report["cases"]] == list(CASES)
    for case in report["cases"]:
        assert set(case["profiles"]) == {"hier", "flat@disk", "flat@cloud"}
        assert set(case["profiles"]["hier"]) == {"flash", "disk", "cloud"}
        assert [x["tier"] for x in case["per_level"]["hier"]] == ["flash", "disk", "cloud"]
        for row in case["rows"]:
            assert isinstance(row["flat_over_hier"], float)
            for side in ("hier", "flat"):
                s = row[side]
                assert s["n"] == len(s["samples_ms"]) > 0
                assert s["mean_ms"] > 0
                assert s["analytic_mean_ms"] >= 0
                assert set(s["levels"]) == ({"1", "2", "3"} if side == "hier" else {"1"})
    seed = report["cases"][0]
    assert all(p["name"].endswith("@scaled") for p in seed["profiles"]["hier"].values())
    for goal in report["goals"]:
        assert goal["case"] == "seed"
        assert isinstance(goal["met"], bool)
    e2e = report["e2e"]
    assert set(e2e["ttft"]) == {"hier", "flat", "off"}
    assert all(s["n"] == 3 and s["mean_ms"] > 0 for s in e2e["ttft"].values())
    assert e2e["flat_over_hier"] > 0

    for png in ("latency.png", "latency-levels.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    profiles = tomllib.loads((out / "profiles.toml").read_text())
    cloud, scaled = profiles["seed-cloud"], profiles["seed-cloud@scaled"]
    assert scaled["bandwidth_mb_s"] == pytest.approx(cloud["bandwidth_mb_s"] / report["scale"])
