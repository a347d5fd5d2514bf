"""The demo command's wiring: corpus, bank and report land under the data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.bank import Bank
from server.build.demo import build_demo, data_dir


@pytest.mark.slow
def test_demo_writes_corpus_bank_and_report(tmp_path: Path) -> None:
    result = build_demo(tmp_path, progress=False, pretrain_steps=3, memory_steps=3)
    assert (tmp_path / "demo-corpus" / "facts.jsonl").is_file()
    assert Bank.open(tmp_path / "demo-bank").manifest.bank_id == "demo"
    assert result.report.tally("memory").total == 718
    assert "### element (118 facts)" in result.report.table()


def test_data_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HMEM_DATA_DIR", str(tmp_path / "d"))
    assert data_dir() == tmp_path / "d"
    monkeypatch.delenv("HMEM_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "x" / "hmem"
