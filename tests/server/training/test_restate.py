"""Mining a corpus's recurring phrasings and restating its facts in each of them."""

from __future__ import annotations

from server.training.realdata import geonames_corpus
from server.training.restate import mine, sentences_of
from server.training.synth import generate_corpus

FORMS = (
    "The capital of {a} is {b}.",
    "{a} has its capital at {b}.",
    "{b} is the capital of {a}.",
)
PAIRS = [("Zorbin", "Mavel"), ("Kelo", "Triss"), ("Ambar", "Nodd"), ("Pilo", "Westa")]


def corpus_with(rare: tuple[str, str], rare_form: int) -> list[str]:
    """Frequent islands in every form; one rare island in one form only; unrelated filler."""
    texts = [form.format(a=a, b=b) + " Boats sail there." for a, b in PAIRS for form in FORMS]
    texts.append(FORMS[rare_form].format(a=rare[0], b=rare[1]))
    texts += ["The weather was mild and the wind came from the west."] * 5
    return texts


def test_a_rare_fact_is_restated_in_every_phrasing_of_its_relation() -> None:
    found = mine(corpus_with(("Quon", "Bexa"), rare_form=2))
    assert "The capital of Quon is Bexa." in found.sentences  # asked this way, never said so
    assert "Quon has its capital at Bexa." in found.sentences
    assert "Bexa is the capital of Quon." not in found.sentences  # already in the corpus
    assert len(found.relations) == 1
    assert ("Quon", "Bexa") in found.relations[0].facts or ("Bexa", "Quon") in (
        found.relations[0].facts
    )
    assert not any("Mavel" in s and "Quon" in s for s in found.sentences)  # no pair invented


def test_sentence_openers_are_not_names_and_numbers_are() -> None:
    texts = [f"Element number {z} is {name}." for z, name in ((1, "Hydrogen"), (2, "Helium"))]
    texts += [
        f"The atomic number of {name} is {z}." for z, name in ((1, "Hydrogen"), (2, "Helium"))
    ]
    texts += ["Element number 3 is Lithium.", "The atomic number of Beryllium is 4."]
    texts += ["the element list is long.", "an element of truth."]
    found = mine(texts, min_pairs=2, min_shared=2)
    assert "The atomic number of Lithium is 3." in found.sentences
    assert "Element number 4 is Beryllium." in found.sentences


def test_a_phrasing_that_says_more_than_the_relation_is_not_used_for_other_facts() -> None:
    names = ["Ana Lopo", "Bel Trom", "Cid Marr", "Dov Sel", "Eli Varn", "Fay Dunn", "Gus Holt"]
    people = [(n, str(1700 + 11 * i)) for i, n in enumerate(names)]
    texts = [f"Records say {n} was born in {y}." for n, y in people]
    texts += [f"Records say {n} came into the world in {y}." for n, y in people[:5]]
    poets = [("Hal Brin", "1801"), ("Ida Wolk", "1802")]
    texts += [f"The poet {n} was born in the year {y}." for n, y in poets]
    texts += [f"Records say {n} was born in {y}." for n, y in poets]
    found = mine(texts, min_pairs=2, min_shared=2)
    assert "Records say Gus Holt came into the world in 1766." in found.sentences
    assert "Records say Hal Brin came into the world in 1801." in found.sentences
    # "The poet A was born in the year B" says more than the birth year: only 2 of 9 facts.
    assert not any(s.startswith("The poet") for s in found.sentences)


def test_the_synthetic_corpus_gets_its_rare_facts_in_the_queried_form() -> None:
    corpus = generate_corpus(seed=0)
    found = mine([d["text"] for d in corpus.documents])
    restated = set(found.sentences)
    unseen = [f for f in corpus.facts if not f.query_form_seen]
    assert unseen
    answered = [f for f in unseen if f.statement in restated]
    assert len(answered) >= 0.9 * len(unseen)
    # Every restated query-form sentence states its fact's true answer.
    truth = {f.query: f.answer for f in corpus.facts}
    for sentence in found.sentences:
        for query, answer in truth.items():
            if sentence.startswith(query + " "):
                assert sentence == f"{query}{answer}.", sentence


def test_real_data_relations_that_overlap_are_kept_apart() -> None:
    corpus = geonames_corpus(seed=0)
    found = mine([d["text"] for d in corpus.documents])
    truth = {f.query: f.answer for f in corpus.facts}
    capitals = [f for f in corpus.facts if f.family == "capital" and not f.query_form_seen]
    restated = set(found.sentences)
    assert sum(f.statement in restated for f in capitals) >= 0.5 * len(capitals)
    wrong = [
        s
        for s in found.sentences
        for q, a in truth.items()
        if s.startswith(q + " ") and s != f"{q}{a}."
    ]
    assert len(wrong) <= 0.01 * len(found.sentences), wrong[:5]


def test_sentences_split_at_their_ends() -> None:
    assert sentences_of("One two. Three four! Five?") == ["One two.", "Three four!", "Five?"]
