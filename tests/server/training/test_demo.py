"""The demo command's wiring: corpus, bank and report land under the data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.bank import Bank
from server.training.demo import build_demo


@pytest.mark.slow
def test_demo_writes_corpus_bank_and_report(tmp_path: Path) -> None:
    result = build_demo(tmp_path, progress=False, pretrain_steps=3, memory_steps=3)
    assert (tmp_path / "demo-corpus" / "facts.jsonl").is_file()
    assert Bank.open(tmp_path / "demo-bank").manifest.bank_id == "demo"
    assert result.report.tally("memory").total == 718
    assert "### element (118 facts)" in result.report.table()
