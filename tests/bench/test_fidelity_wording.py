"""Table 6 of bench.fidelity without the whole bench: the wording-disjoint queries of the generated
corpora share no word with them but the entity's name, and keep each fact's answer and bucket; a
template that shares a word is not used; and routing measured without training is the routing
of the bank built with the same settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.fidelity.routing import RoutingTask, bank_routing, run_routing
from bench.fidelity.wording import TEMPLATES, disjoint_queries, vocabulary, words
from server.training.facts import FACTS_FILE
from server.training.pipeline import BuildSettings, build_bank
from server.training.queries import load_queries
from server.training.realdata import geonames_corpus
from server.training.synth import CORPUS_FILE, SynthCorpus, generate_corpus


@pytest.mark.parametrize("source", ["synthetic", "geonames"])
def test_every_fact_is_asked_in_words_no_document_uses(source: str) -> None:
    corpus: SynthCorpus = generate_corpus() if source == "synthetic" else geonames_corpus()
    texts = [d["text"] for d in corpus.documents]
    seen = vocabulary(texts)
    reworded = disjoint_queries(corpus.facts, texts)
    assert reworded.unasked == {}
    assert reworded.originals == corpus.facts
    for asked, fact in zip(reworded.facts, corpus.facts, strict=True):
        assert (words(asked.query) - words(fact.entity)).isdisjoint(seen), asked.query
        assert fact.entity.lower() in asked.query.lower()
        assert asked == dataclasses.replace(fact, query=asked.query, query_form_seen=False)
    # Each family's templates take turns, so every bucket is asked in several wordings.
    for family, used in reworded.templates.items():
        assert used == list(TEMPLATES[family])


def test_a_template_sharing_a_word_with_the_corpus_is_not_used() -> None:
    corpus = generate_corpus(families=("element",), filler_docs=0)
    texts = [d["text"] for d in corpus.documents]
    first, *others = TEMPLATES["element"]
    reworded = disjoint_queries(corpus.facts, [*texts, first.format(name="")])
    assert reworded.templates == {"element": others}
    # Every template's words in the corpus: no fact can be asked so.
    every = " ".join(t.format(name="") for t in TEMPLATES["element"])
    reworded = disjoint_queries(corpus.facts, [*texts, every])
    assert reworded.facts == []
    assert reworded.unasked == {"element": len(corpus.facts)}


def test_routing_without_training_is_the_built_banks(tmp_path: Path) -> None:
    synth = generate_corpus(
        families=("island",), invented_entities=20, max_mentions=20, filler_docs=40
    )
    synth.write(tmp_path / "corpus")
    facts_file = tmp_path / "corpus" / FACTS_FILE
    settings = BuildSettings(
        corpus=tmp_path / "corpus" / CORPUS_FILE,
        out=tmp_path / "bank",
        levels=2,
        branching=4,
        widths=(8, 4),
        pretrain_steps=2,
        memory_steps=2,
        threads=1,
        progress=False,
    )
    build_bank(settings)
    rare = (3, 4)
    got = run_routing(RoutingTask(settings.embedder, settings.seed, settings, facts_file, rare))
    facts = load_queries(facts_file)
    reworded = disjoint_queries(facts, [d["text"] for d in synth.documents])
    disjoint = tmp_path / "disjoint.jsonl"
    disjoint.write_text("".join(json.dumps(dataclasses.asdict(f)) + "\n" for f in reworded.facts))
    for kind, asked in (("own", facts), ("disjoint", load_queries(disjoint))):
        cells = bank_routing(settings.out, settings, asked, rare)
        leaf = got[kind]["leaf"]
        assert cells == leaf
        assert cells["all"]["total"] == len(facts)
    assert got["unheld"] == 0
    assert got["asked"] == len(facts)
    # A query routed to the right leaf is under the right level-1 node.
    for kind in ("own", "disjoint"):
        assert got[kind]["level1"]["all"]["correct"] >= got[kind]["leaf"]["all"]["correct"]
