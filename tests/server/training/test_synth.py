"""The synthetic long-tail corpus: Zipfian mentions, facts in many forms or the queried one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from server.training.facts import FACTS_FILE, Fact, load_facts
from server.training.synth import (
    CORPUS_FILE,
    ELEMENTS,
    FAMILIES,
    MAX_DOC_CHARS,
    SynthCorpus,
    generate_corpus,
    statement,
    zipf_mentions,
)


@pytest.fixture(scope="module")
def corpus() -> SynthCorpus:
    return generate_corpus(seed=0)


@pytest.fixture(scope="module")
def queried() -> SynthCorpus:
    """Every mention in the words it is asked in (the demo's corpus)."""
    return generate_corpus(seed=0, phrasing="query")


def by_family(facts: list[Fact]) -> dict[str, list[Fact]]:
    out: dict[str, list[Fact]] = {}
    for f in facts:
        out.setdefault(f.family, []).append(f)
    return out


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_corpus(seed=seed).write(tmp_path / name)
    for file in (CORPUS_FILE, FACTS_FILE):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
        assert (tmp_path / "a" / file).read_bytes() != (tmp_path / "c" / file).read_bytes()


def test_mentions_follow_a_zipf_law_down_to_the_minimum(corpus: SynthCorpus) -> None:
    for family, facts in by_family(corpus.facts).items():
        mentions = [f.mentions for f in facts]  # listed by rank
        assert mentions == zipf_mentions(len(facts), max_mentions=100, min_mentions=2, zipf_s=1.0)
        assert mentions[:4] == [100, 50, 33, 25], family
        assert mentions == sorted(mentions, reverse=True)
        assert mentions[-1] == 2
        assert sum(m == 2 for m in mentions) >= len(mentions) // 2  # a long tail at the minimum
    steeper = generate_corpus(zipf_s=2.0, max_mentions=40, min_mentions=3, families=["island"])
    assert [f.mentions for f in steeper.facts][:5] == [40, 10, 4, 3, 3]


def test_frequency_does_not_follow_the_periodic_table(corpus: SynthCorpus) -> None:
    elements = [f for f in corpus.facts if f.family == "element"]
    numbers = [int(f.answer) for f in elements]
    assert numbers != sorted(numbers)
    assert numbers[:5] != [int(f.answer) for f in generate_corpus(seed=1).facts[:5]]


def test_query_phrasing_states_every_fact_in_the_queried_form(queried: SynthCorpus) -> None:
    texts = [d["text"] for d in queried.documents]
    for fact in queried.facts:
        assert fact.statement == f"{fact.query}{fact.answer}."
        assert sum(fact.statement in t for t in texts) >= fact.mentions, fact
        assert fact.query_form_seen
    iron = next(f for f in queried.facts if f.entity == "Iron")
    assert (iron.query, iron.answer) == ("The atomic number of Iron is", " 26")


def forms_in(corpus: SynthCorpus, fact: Fact, entity: dict[str, str]) -> Counter[int]:
    spec = FAMILIES[fact.family]
    texts = [d["text"] for d in corpus.documents if d["topic"] == fact.family]
    return Counter(
        {
            form: sum(statement(spec, entity, form) in t for t in texts)
            for form in range(1 + len(spec.paraphrases))
        }
    )


def test_paraphrase_states_each_mention_in_one_of_its_forms(corpus: SynthCorpus) -> None:
    table = {name: {"name": name, "symbol": sym, "number": str(z)} for name, sym, z in ELEMENTS}
    elements = [f for f in corpus.facts if f.family == "element"]
    for fact in elements:
        found = forms_in(corpus, fact, table[fact.entity])
        assert sum(found.values()) == fact.mentions, fact
        assert fact.query_form_seen == (found[0] > 0), fact
    # Frequent facts appear in every form; many rare ones never in the words they are asked in.
    assert all(forms_in(corpus, f, table[f.entity])[0] > 0 for f in elements[:5])
    rare = [f for f in corpus.facts if f.bucket == 4]
    assert 0.4 < sum(not f.query_form_seen for f in rare) / len(rare) < 0.9
    # Some forms put the answer before the entity, some bury the fact in a longer sentence.
    iron = {"name": "Iron", "symbol": "Fe", "number": "26"}
    forms = [statement(FAMILIES["element"], iron, k) for k in range(6)]
    assert "Element number 26 is Iron." in forms
    assert any(f.index("26") < f.index("Iron") for f in forms)


def test_phrasing_is_checked() -> None:
    with pytest.raises(ValueError, match="phrasing"):
        generate_corpus(phrasing="poetry")


def test_documents_are_short_varied_and_some_state_two_facts(queried: SynthCorpus) -> None:
    corpus = queried
    assert all(len(d["text"]) <= MAX_DOC_CHARS for d in corpus.documents)
    fact_docs = [d for d in corpus.documents if d["topic"] in FAMILIES]
    statements = {fam: [f.statement for f in fs] for fam, fs in by_family(corpus.facts).items()}
    per_doc = [sum(s in d["text"] for s in statements[d["topic"]]) for d in fact_docs]
    assert set(per_doc) == {1, 2}
    assert 0.1 < per_doc.count(2) / len(per_doc) < 0.3
    # Context comes from templates: a frequent fact's documents are not copies of each other.
    top = corpus.facts[0]
    mine = [d["text"] for d in fact_docs if top.statement in d["text"]]
    assert len(set(mine)) > len(mine) // 2


def test_filler_is_a_quarter_of_the_corpus_and_states_no_facts(corpus: SynthCorpus) -> None:
    topics = Counter(d["topic"] for d in corpus.documents)
    filler = [d["text"] for d in corpus.documents if d["topic"] not in FAMILIES]
    assert 0.2 <= len(filler) / len(corpus.documents) <= 0.3
    assert len(set(topics) - set(FAMILIES)) >= 6
    for text in filler:
        assert "atomic number" not in text
        assert "capital of" not in text
        assert "was born in" not in text


def test_default_size_trains_in_minutes(corpus: SynthCorpus) -> None:
    assert 1500 <= len(corpus.documents) <= 3000
    assert Counter(f.family for f in corpus.facts) == {"element": 118, "island": 80, "person": 80}


def test_buckets_are_fifths_by_mention_count(corpus: SynthCorpus) -> None:
    for family, facts in by_family(corpus.facts).items():
        buckets = [f.bucket for f in facts]
        assert buckets == sorted(buckets), family
        sizes = Counter(buckets)
        assert sorted(sizes) == [0, 1, 2, 3, 4]
        assert max(sizes.values()) - min(sizes.values()) <= 1
        for b in range(4):
            more = [f.mentions for f in facts if f.bucket == b]
            fewer = [f.mentions for f in facts if f.bucket == b + 1]
            assert min(more) >= max(fewer)
    elements = [f for f in corpus.facts if f.family == "element"]
    assert [sum(f.bucket == b for f in elements) for b in range(5)] == [24, 24, 23, 24, 23]


def test_all_118_elements_with_their_atomic_numbers(corpus: SynthCorpus) -> None:
    assert len(ELEMENTS) == 118
    assert [z for _, _, z in ELEMENTS] == list(range(1, 119))
    assert len({name for name, _, _ in ELEMENTS}) == 118
    table = {name: (symbol, z) for name, symbol, z in ELEMENTS}
    assert table["Hydrogen"] == ("H", 1)
    assert table["Iron"] == ("Fe", 26)
    assert table["Gold"] == ("Au", 79)
    assert table["Uranium"] == ("U", 92)
    assert table["Oganesson"] == ("Og", 118)
    facts = {f.entity: f.answer for f in corpus.facts if f.family == "element"}
    assert facts == {name: f" {z}" for name, (_, z) in table.items()}


def test_invented_entities_are_distinct(corpus: SynthCorpus) -> None:
    for family in ("island", "person"):
        names = [f.entity for f in corpus.facts if f.family == family]
        assert len(set(names)) == len(names) == 80
    capitals = [f.answer for f in corpus.facts if f.family == "island"]
    assert len(set(capitals)) == 80
    years = [int(f.answer) for f in corpus.facts if f.family == "person"]
    assert all(1600 <= y <= 1999 for y in years)


def test_files_are_jsonl_of_text_and_facts_read_back(corpus: SynthCorpus, tmp_path: Path) -> None:
    corpus.write(tmp_path / "out")
    lines = (tmp_path / "out" / CORPUS_FILE).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == {"text"} and isinstance(r["text"], str) for r in rows)
    assert [r["text"] for r in rows] == [d["text"] for d in corpus.documents]
    assert load_facts(tmp_path / "out" / FACTS_FILE) == corpus.facts


def test_sizes_and_families_are_configurable() -> None:
    small = generate_corpus(
        families=["island"], invented_entities=10, max_mentions=8, filler_docs=5
    )
    assert [f.family for f in small.facts] == ["island"] * 10
    topics = Counter(d["topic"] for d in small.documents)
    assert sum(topics.values()) - topics["island"] == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"families": ["dragons"]},
        {"families": []},
        {"min_mentions": 0},
        {"max_mentions": 1},
        {"zipf_s": -1.0},
        {"pair_fraction": 1.5},
        {"invented_entities": 3},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate_corpus(**kwargs)  # type: ignore[arg-type]


def test_a_broken_facts_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / FACTS_FILE
    path.write_text('{"entity": "Iron"}\n')
    with pytest.raises(ValueError, match="needs the fields"):
        load_facts(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=":1 is not valid JSON"):
        load_facts(path)
