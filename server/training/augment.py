"""Training-data handling that helps a causal model answer a fact asked in other words.

A causal language model learns "A is the capital of B" as a continuation from A to B; asked
"The capital of B is", it has nothing to continue from: the reversal curse (`docs/longtail.md`,
finding 9). Reverse training (Golovneva et al., 2024, "Reverse training to nurse the reversal
curse") adds each training text a second time with its word order reversed, names kept intact,
so that every relation is also seen with its second entity first. The reversed copy is routed
with its original, so it trains the same memories.

Names are kept whole: a run of capitalised words ("Retron Gutho") and a number with its
punctuation stay in reading order; only the order of those units is reversed. Sentences are
reversed one at a time, so a fact never spans two of them after reversal.
"""

from __future__ import annotations

import re

_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
_WORD = re.compile(r"[\w'’-]+|[^\w\s]")


def _units(sentence: str) -> list[str]:
    """Words of a sentence, with runs of capitalised words merged into one name."""
    units: list[str] = []
    name: list[str] = []
    for word in _WORD.findall(sentence):
        if word[:1].isupper():
            name.append(word)
            continue
        if name:
            units.append(" ".join(name))
            name = []
        units.append(word)
    if name:
        units.append(" ".join(name))
    return units


def reverse_sentence(sentence: str) -> str:
    """One sentence with its units in reverse order and its final punctuation kept last.

    "Mavel is the capital of Zorbin." -> "Zorbin of capital the is Mavel."
    """
    units = _units(sentence.strip())
    end = units.pop() if units and units[-1] in (".", "!", "?") else ""
    body = [u for u in reversed(units) if u not in (",", ";", ":")]
    return " ".join(body) + end


def reverse_text(text: str) -> str:
    """Every sentence of `text` reversed in place (sentence order kept)."""
    sentences = [s for s in _SENTENCE.findall(text) if s.strip()]
    return " ".join(reverse_sentence(s) for s in sentences)


__all__ = ["reverse_sentence", "reverse_text"]
