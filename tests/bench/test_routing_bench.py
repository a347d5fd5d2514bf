"""Smoke test of bench.routing on a small synthetic corpus: one table row per IDF power, with
counts that add up to the facts of each column. The fractions themselves are not checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.training.synth import generate_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_one_row_per_idf_power_over_every_fact(tmp_path: Path) -> None:
    generate_corpus(seed=0, invented_entities=20, filler_docs=60).write(tmp_path)
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.routing",
            "--corpus", str(tmp_path / "corpus.jsonl"), "--facts", str(tmp_path / "facts.jsonl"),
            "--idf-power", "1", "2", "--branching", "4",
        ],
        capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| idf power | rarest elements |")
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]
    facts = [json.loads(line) for line in (tmp_path / "facts.jsonl").read_text().splitlines()]
    for row in rows:
        totals = [int(m) for m in re.findall(r"\d+/(\d+)", row)]
        assert totals[-1] == len(facts)  # the last column counts every fact
