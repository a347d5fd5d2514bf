"""Knowledge augmentation mined from the corpus: each fact restated in all its relation's phrasings.

A fact seen twice, in two phrasings, is stored as those sentences: asked in a third phrasing, a
small model does not answer it (`docs/longtail.md`, finding 9). Facts become extractable when
the training text states each of them in many phrasings (Allen-Zhu and Li, "Physics of Language
Models", part 3.1). A corpus already shows which phrasings say the same thing: its frequent
entities appear in all of them, with the same pair of names. This module finds those phrasings
and restates every fact it finds in each of them, as extra training sentences. It reads nothing
but the corpus and knows no relation in advance.

1. Each sentence's *units*: its names (runs of capitalised words whose lower-case form never
   occurs in the corpus, so "The" or "Ferries" opening a sentence is no name) and its numbers.
2. A sentence with two units gives a *pattern*: the sentence with its first unit replaced by A and
   its second by B ("The capital of A is B."), and the pair of units it was seen with. A sentence
   with more units gives one pattern per pair, its other units as wildcards (never restated).
3. Patterns seen with at least `min_pairs` distinct pairs are kept. Two patterns that share at
   least `min_shared` pairs (in the same order, or reversed: "B is the capital of A.") state one
   relation; relations are the connected groups, each pattern with its orientation.
4. A relation's facts are the pairs any of its patterns was seen with. Each fact is restated in
   every pattern of its relation that has no wildcard; the sentences already in the corpus are
   not repeated.

The restated sentences are training windows like any other: the build routes each through the
cluster tree, so a rare entity's restatements train the memories its own documents reach.
Where a relation is written in free prose rather than recurring phrasings, little is mined;
`hmem build` prints how many relations, facts and sentences were found.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# A sentence ends at . ! or ? before a space and a capital (or the text's end), unless the
# period closes an abbreviation: an initial ("U.S."), or a short title ("St. George's").
_END = re.compile(r"[.!?](?=\s+[^\W\d_]|\s*$)")
_ABBREVIATION = re.compile(r"(?:\b[A-Z]|\b(?:St|Mt|Ft|Dr|Mr|Mrs|Ms|Jr|Sr|No|Co|vs|etc))$")
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_](?:[\w'’-]*\w)?|\S")
_WILDCARD = "\x00*"  # a unit that is neither of a pattern's two slots


@dataclass(frozen=True, slots=True)
class Pattern:
    """A sentence with two slots: `parts` alternates literal text and slot names "A"/"B"/"*"."""

    parts: tuple[str, ...]

    @property
    def restatable(self) -> bool:
        return _WILDCARD not in self.parts

    def render(self, a: str, b: str) -> str:
        return "".join(a if p == "A" else b if p == "B" else p for p in self.parts)


@dataclass
class Relation:
    """Patterns that state one relation, each oriented so that A and B mean the same thing."""

    patterns: list[Pattern]
    facts: set[tuple[str, str]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Restatements:
    """What was mined from a corpus, and the sentences it adds."""

    relations: list[Relation]
    sentences: list[str]

    def summary(self) -> str:
        facts = sum(len(r.facts) for r in self.relations)
        return (
            f"{len(self.relations)} relations, {facts} facts, "
            f"{len(self.sentences)} restated sentences"
        )


def sentences_of(text: str) -> list[str]:
    """The sentences of `text`, each with its final punctuation."""
    out, start = [], 0
    for m in _END.finditer(text):
        if m.group() == "." and _ABBREVIATION.search(text, start, m.start()):
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def _lower_words(texts: Iterable[str]) -> set[str]:
    """Words the corpus writes in lower case: no names ("the", but also "ferries" if seen so)."""
    words: set[str] = set()
    for text in texts:
        words.update(w for w in re.findall(r"[^\W\d_]+", text) if w.islower())
    return words


_ARTICLES = frozenset({"The", "A", "An"})
_JOINERS = frozenset({"of", "de", "la", "del", "da", "du", "von", "van"})  # "Port of Spain"


def _units(sentence: str, common: set[str]) -> list[tuple[int, int]]:
    """Character spans of the sentence's names and numbers.

    A name is a run of capitalised words (joined by single spaces, or by "of", "de", ... as in
    "Port of Spain") with at least one word the corpus never writes in lower case: "North
    Macedonia" is one name although "north" is a common word; "The" alone is none.
    """
    spans: list[tuple[int, int]] = []
    run: list[tuple[int, int, bool]] = []  # (start, end, is a name word) of the open run

    def close() -> None:
        while run and not sentence[run[-1][0]].isupper():
            run.pop()  # a joiner ends no name
        if len(run) > 1 and sentence[run[0][0] : run[0][1]] in _ARTICLES:
            run.pop(0)  # "The United States" opening a sentence is "the United States"
        if any(named for _, _, named in run):
            spans.append((run[0][0], run[-1][1]))
        run.clear()

    for m in _TOKEN.finditer(sentence):
        word, start = m.group(), m.start()
        adjacent = bool(run) and sentence[run[-1][1] : start] == " "
        if word[0].isupper():
            if not adjacent:
                close()
            run.append((start, m.end(), word.lower() not in common))
            continue
        if adjacent and word in _JOINERS and sentence[run[-1][0]].isupper():
            run.append((start, m.end(), False))
            continue
        close()
        if word[0].isdigit():
            spans.append((start, m.end()))
    close()
    return spans


def _readings(sentence: str, common: set[str]) -> list[list[tuple[int, int]]]:
    """The sentence's units; twice when it opens with one capitalised word that may be no name.

    "Ferries to Zorbin dock at Mavel." opens with a word that only the capital letter marks: it
    is read with "Ferries" as a name and as a plain word, and the patterns decide.
    """
    spans = _units(sentence, common)
    first = sentence[slice(*spans[0])] if spans and spans[0][0] == 0 else ""
    if first and " " not in first and not first.isdigit():
        return [spans, spans[1:]]
    return [spans]


def _patterns(sentence: str, common: set[str]) -> list[tuple[Pattern, tuple[str, str]]]:
    out = []
    for spans in _readings(sentence, common):
        if not 2 <= len(spans) <= 4:
            continue
        for i in range(len(spans)):
            for j in range(i + 1, len(spans)):
                parts: list[str] = []
                pos = 0
                for k, (start, end) in enumerate(spans):
                    parts += [sentence[pos:start], "A" if k == i else "B" if k == j else _WILDCARD]
                    pos = end
                parts.append(sentence[pos:])
                pair = (sentence[slice(*spans[i])], sentence[slice(*spans[j])])
                if pair[0] != pair[1]:
                    out.append((Pattern(tuple(parts)), pair))
    return out


class _Groups:
    """Union-find over patterns, with each pattern's orientation relative to its root."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.flip = [False] * n  # True: A and B swapped relative to the parent

    def find(self, i: int) -> tuple[int, bool]:
        flip = False
        while self.parent[i] != i:
            flip ^= self.flip[i]
            i = self.parent[i]
        return i, flip

    def union(self, i: int, j: int, reversed_: bool) -> None:
        (ri, fi), (rj, fj) = self.find(i), self.find(j)
        if ri != rj:
            self.parent[rj] = ri
            self.flip[rj] = fi ^ fj ^ reversed_


def mine(
    texts: Sequence[str],
    *,
    min_pairs: int = 3,
    min_shared: int = 3,
    min_overlap: float = 0.2,
    min_coverage: float = 0.25,
) -> Restatements:
    """The relations `texts` state in recurring phrasings, and each fact restated in all of them."""
    common = _lower_words(texts)
    seen_sentences: set[str] = set()
    pairs_of: dict[Pattern, set[tuple[str, str]]] = defaultdict(set)
    for text in texts:
        for sentence in sentences_of(text):
            seen_sentences.add(sentence)
            for pattern, pair in _patterns(sentence, common):
                pairs_of[pattern].add(pair)
    kept = [p for p, pairs in pairs_of.items() if len(pairs) >= min_pairs]
    index = {p: i for i, p in enumerate(kept)}
    groups = _Groups(len(kept))
    by_pair: dict[frozenset[str], list[tuple[int, tuple[str, str]]]] = defaultdict(list)
    for p in kept:
        for pair in pairs_of[p]:
            by_pair[frozenset(pair)].append((index[p], pair))
    shared: dict[tuple[int, int, bool], int] = defaultdict(int)
    for seen in by_pair.values():
        for x, (i, pi) in enumerate(seen):
            for j, pj in seen[x + 1 :]:
                if i != j:
                    shared[(min(i, j), max(i, j), pi != pj)] += 1
    for (i, j, reversed_), count in shared.items():
        union = len(pairs_of[kept[i]]) + len(pairs_of[kept[j]]) - count
        if count >= min_shared and count >= min_overlap * union:
            groups.union(i, j, reversed_)
    members: dict[int, list[tuple[Pattern, bool]]] = defaultdict(list)
    for p in kept:
        root, flip = groups.find(index[p])
        members[root].append((p, flip))
    relations = []
    sentences: list[str] = []
    for group in members.values():
        if len(group) < 2:
            continue  # one phrasing only: nothing to restate
        relation = Relation(patterns=[p for p, _ in group])
        for p, flip in group:
            relation.facts.update((b, a) if flip else (a, b) for a, b in pairs_of[p])
        # A phrasing that carries more than the relation ("The sailor A was born in B") covers
        # few of its facts: restating others in it would state what the corpus never said.
        widest = max(len(pairs_of[p]) for p, _ in group)
        oriented = [
            (p, flip)
            for p, flip in group
            if p.restatable and len(pairs_of[p]) >= min_coverage * widest
        ]
        for a, b in sorted(relation.facts):
            for p, flip in oriented:
                text = p.render(b, a) if flip else p.render(a, b)
                if text not in seen_sentences:
                    seen_sentences.add(text)
                    sentences.append(text)
        relations.append(relation)
    return Restatements(relations=relations, sentences=sentences)


__all__ = ["Pattern", "Relation", "Restatements", "mine", "sentences_of"]
