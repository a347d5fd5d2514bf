"""Queries in words no document uses: each fact asked so that, but for the entity's own name,
not one of the query's words occurs anywhere in the corpus.

A corpus's own phrasings, and the paraphrases restating adds, are what a memory is trained on;
a user asks in their own words. These templates ask each generated family's fact (synthetic
elements, islands and people; GeoNames capitals and cities) in words chosen to be absent from
those corpora ("Protons per Iron nucleus:" for "The atomic number of Iron is"), and
`disjoint_queries` checks every query against the corpus it is asked of: a template sharing a
word with some document is not used for it, and a fact with no template left is not asked. The
words of the entity's name (`Fact.entity`) are the one overlap allowed: without them nothing
routes. Words are lower-cased `\\w+` runs, as the hashed TF-IDF embedder splits text.

Each fact keeps its answer, bucket and mentions, so accuracy by bucket on these queries compares
with the corpus's own queries; its `query_form_seen` is False (no document says it so).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.training.facts import Fact
from server.training.synth import sentence

_WORD = re.compile(r"\w+")

# Per family, templates whose answer follows as the corpus's does (" 26", " Paris", " 1734").
# Each is written in words none of the generated corpora use; the check is made per corpus.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "element": (
        "Protons per {name} nucleus:",
        "Nuclear charge Z, {name}:",
        "Proton total inside {name} atoms equals",
    ),
    "island": (
        "{name} government headquarters:",
        "Administrative seat, {name}:",
        "Which settlement rules {name}? Answer:",
    ),
    "person": (
        "{name} entered life during",
        "Birthdate, {name}: circa",
        "{name} nativity, circa",
    ),
    "capital": (
        "{name} government headquarters:",
        "Administrative seat, {name}:",
        "Which metropolis rules {name}? Answer:",
    ),
    "city": (
        "Sovereign nation containing {name}:",
        "{name} belongs inside which sovereign state? Answer:",
        "Nationality, {name} residents:",
    ),
}


def words(text: str) -> set[str]:
    """The lower-cased `\\w+` words of `text`."""
    return set(_WORD.findall(text.lower()))


def vocabulary(texts: Iterable[str]) -> set[str]:
    """Every word of `texts`."""
    out: set[str] = set()
    for text in texts:
        out.update(_WORD.findall(text.lower()))
    return out


@dataclass(frozen=True)
class Reworded:
    """A corpus's facts asked in words it never uses, and what could not be so asked."""

    facts: list[Fact]  # one per fact asked, in the order of the corpus's facts
    originals: list[Fact]  # the same facts in the corpus's own query form
    unasked: dict[str, int]  # per family, facts left out: no template free of the corpus's words
    templates: dict[str, list[str]]  # per family, the templates used


def disjoint_queries(facts: Sequence[Fact], corpus: Sequence[str]) -> Reworded:
    """Each fact of `facts` asked in a template of its family that shares no word with `corpus`
    (its documents' texts) but the entity's name; templates taken in turn within a family, so
    the wordings spread over the buckets."""
    seen = vocabulary(corpus)
    asked: list[Fact] = []
    originals: list[Fact] = []
    unasked: dict[str, int] = {}
    used: dict[str, list[str]] = {}
    turn: dict[str, int] = {}
    for fact in facts:
        name = words(fact.entity)
        usable = [
            t
            for t in TEMPLATES.get(fact.family, ())
            if not (words(t.format(name=fact.entity)) - name) & seen
        ]
        if not usable:
            unasked[fact.family] = unasked.get(fact.family, 0) + 1
            continue
        i = turn.get(fact.family, 0)
        turn[fact.family] = i + 1
        template = usable[i % len(usable)]
        if template not in used.setdefault(fact.family, []):
            used[fact.family].append(template)
        query = sentence(template.format(name=fact.entity))
        asked.append(dataclasses.replace(fact, query=query, query_form_seen=False))
        originals.append(fact)
    return Reworded(facts=asked, originals=originals, unasked=unasked, templates=used)
