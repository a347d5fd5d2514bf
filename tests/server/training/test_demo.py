"""The demo command's wiring: corpus (documents and conversations), bank and report land under
the data directory, and the report asks every fact as a completion and as a chat question."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.bank import Bank
from server.training.demo import build_demo
from server.training.queries import load_queries


@pytest.mark.slow
def test_demo_writes_corpus_bank_and_report(tmp_path: Path) -> None:
    result = build_demo(tmp_path, progress=False, pretrain_steps=3, memory_steps=3)
    assert (tmp_path / "demo-corpus" / "facts.jsonl").is_file()
    corpus = (tmp_path / "demo-corpus" / "corpus.jsonl").read_text(encoding="utf-8")
    mentions = sum(f.mentions for f in load_queries(tmp_path / "demo-corpus" / "facts.jsonl"))
    assert corpus.count("<|assistant|>") == mentions  # one conversation per mention of a fact
    assert Bank.open(tmp_path / "demo-bank").manifest.bank_id == "demo"
    assert result.report.tally("memory").total == 718
    assert result.report.tally("chat memory").total == 718
    asked = next(p for p in result.report.predictions if p.mode == "chat memory")
    assert asked.fact.query.startswith(("What is", "In which year"))
    table = result.report.table()
    assert "### element (118 facts)" in table
    assert "| memory | anchor | generic | chat memory | chat anchor |" in table
