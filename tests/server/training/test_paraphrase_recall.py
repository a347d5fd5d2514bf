"""A tiny paraphrased bank, built end to end: facts never said in the words they are asked in.

The corpus states each rare island's capital only in other words ("Mavel is the capital of
Zorbin", "Zorbin has its capital at Mavel"); the query is "The capital of Zorbin is". The
build restates the corpus's facts in every phrasing of their relation (`restate.py`) and trains
memories on them; the anchor alone, pretrained on the same text and then frozen, cannot hold
them all. With the routed memory most such facts are answered; without it almost none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.training.evaluate import evaluate
from server.training.pipeline import BuildSettings, build_bank
from server.training.synth import generate_corpus

pytestmark = pytest.mark.slow


def build_and_ask(tmp_path: Path, *, seed: int, restate: bool) -> dict[str, tuple[int, int]]:
    corpus = generate_corpus(
        seed=seed, families=("island",), invented_entities=24, max_mentions=12, filler_docs=40
    )
    corpus.write(tmp_path / "corpus")
    settings = BuildSettings(
        corpus=tmp_path / "corpus" / "corpus.jsonl", out=tmp_path / "bank", levels=1,
        branching=4, widths=(48,), pretrain_steps=800, memory_steps=1500, batch_size=16,
        seq_len=128, embed_dim=1024, seed=seed, restate=restate, progress=False,
    )  # fmt: skip
    build_bank(settings)
    unseen = [f for f in corpus.facts if not f.query_form_seen]
    assert len(unseen) >= 10  # most rare islands are never stated in the queried form
    report = evaluate(settings.out, unseen, modes=("memory", "anchor"), progress=False)
    return {m: (report.tally(m).correct, report.tally(m).total) for m in report.modes}


def test_a_fact_stated_only_in_other_words_is_answered_with_memory_not_without(
    tmp_path: Path,
) -> None:
    asked = build_and_ask(tmp_path, seed=0, restate=True)
    (memory, n), (anchor, _) = asked["memory"], asked["anchor"]
    # Seeds 0, 1, 2 (this test runs seed 0) gave memory 11/15, 7/14, 13/15 and the anchor alone
    # 0/15, 0/14, 6/15: gaps of 47-73 points. The bounds leave every seed a margin.
    assert memory >= 0.45 * n, asked
    assert memory - anchor >= 0.3 * n, asked
