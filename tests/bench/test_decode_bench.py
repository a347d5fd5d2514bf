"""Smoke test of bench.decode in quick mode: it generates the small shape as a bf16 and an int8
bank, serves both with `hmem serve` (float and `--weights int8`), and reports every figure.
Timings are not checked (the small shape's ratios mean nothing; docs/results.md has the paper
shape's run); what must hold whatever the machine is checked: the int8 bank's bytes, the bytes a
step reads, and int8's logprobs staying close to bf16's."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.decode", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "decode.json").read_text())
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    names = set(result["verdicts"])
    assert "hmem int8 anchor / its ceiling" in names
    assert ("hmem int8 / llama.cpp q8_0" in names) == has_llama
    assert "hmem bf16 / transformers bf16" in names
    for v in result["verdicts"].values():
        assert v["value"] > 0
        assert isinstance(v["met"], bool)
    assert result["bandwidth"]["gb_per_s"] > 0
    for samples in result["decode"].values():
        assert len(samples) == 2
        assert min(samples) > 0
    # int8 weights: a step reads a bit over half of bf16's (scales and float norms on top).
    step = result["quality"]["step_bytes"]
    assert 0.5 < step["int8"] / step["bf16"] < 0.6
    # int8 blocks: 1 byte a weight plus a float32 scale per neuron of each matrix, (d + 4) / 2d
    # of bf16 at the small shape's d = 64.
    banks = result["banks"]
    assert banks["int8"]["bank_bytes"] / banks["bf16"]["bank_bytes"] == pytest.approx(68 / 128)
    for part in ("anchor", "memory"):
        q = result["quality"][part]
        assert q["tokens"] == 8
        assert 0 <= q["mean_abs"] <= q["max_abs"] < 0.5
    assert len(result["cold_s"]["bf16"]) == len(result["cold_s"]["int8"]) == 2
    text = (out / "decode.md").read_text()
    assert "| hmem HTTP, int8, a path's memory |" in text
    assert verdict_rows(text) == len(names)


def verdict_rows(text: str) -> int:
    table = text.split("| goal | measured | bound | met |")[1]
    return sum(line.startswith("| ") and "---" not in line for line in table.splitlines())
