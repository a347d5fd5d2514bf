"""Smoke test of bench.tiers in quick mode: it runs end to end and its output has the right
shape (every tier, size and variant; JSON and PNG written). Timings are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_reports_every_tier_size_and_variant(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.tiers", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| tier | size | raw |" in proc.stdout
    report = json.loads((tmp_path / "tiers.json").read_text())
    rows = report["rows"]
    assert {(r["tier"], r["size_label"]) for r in rows} == {
        (tier, size) for tier in ("lmdb", "disk", "s3") for size in ("64KiB", "1MiB", "8MiB")
    }
    for row in rows:
        for variant in ("raw", "raw-thread", "store", "store-verified"):
            assert row["stats"][variant]["median_s"] > 0
        assert row["ratios"]["store"] > 0
    assert report["aiofiles"]["aiofiles_vs_pread"] > 0
    png = (tmp_path / "tiers.png").read_bytes()
    assert png.startswith(b"\x89PNG")
