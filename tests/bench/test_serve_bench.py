"""Smoke test of bench.serve in quick mode: it starts the real server, runs every case end to
end, and its output has the right shape (the table's rows and columns, JSON keys and types, the
PNG). Timings are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = ("ttft", "ttft_path", "decode", "concurrent", "hf_http", "hf_engine", "hf_loop")


@pytest.mark.slow
def test_quick_run_reports_every_case(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = os.environ | {"HMEM_DATA_DIR": str(tmp_path / "state"), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    header = "| case | measured A | measured B | ratio A/B | goal | met? |"
    assert header in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(CASES)  # the header and one row per case
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 6
        assert cells[3].endswith("x")
        assert cells[5] in {"met", "**missed**"}
    assert "machine:" in proc.stdout
    assert "torch" in proc.stdout

    report = json.loads((out / "serve.json").read_text())
    assert [r["case"] for r in report["rows"]] == list(CASES)
    for r in report["rows"]:
        assert isinstance(r["ratio"], float)
        assert r["ratio"] > 0
        assert isinstance(r["met"], bool)
        assert r["goal_op"] in {"<=", ">=", ">"}
    machine = report["machine"]
    assert isinstance(machine["cores"], int)
    assert isinstance(machine["torch_threads"], int)
    assert isinstance(machine["cpu"], str)
    assert isinstance(machine["torch"], str)
    for case in ("ttft", "decode", "concurrent"):
        assert report[case]["a"] > 0
        assert report[case]["b"] > 0
    assert set(report["ttft"]["samples"]) == {"auto", "path", "off"}
    assert report["concurrent"]["streams"] == 16
    assert report["concurrent"]["distinct_paths"] == 16
    rates = report["hf"]["rates"]
    assert set(rates) == {"http", "engine", "loop", "hf"}
    assert all(v > 0 for v in rates.values())
    agreement = report["hf"]["agreement"]
    for key in ("engine_ids_equal_hf", "loop_ids_equal_hf", "http_text_equal_hf"):
        assert isinstance(agreement[key], bool)
    assert (out / "serve.png").read_bytes().startswith(b"\x89PNG")
