"""A long-tail evaluation's facts: `Fact`, and `facts.jsonl` as `hmem synth` writes it.

Apart from the corpus generator so that `hmem eval` reads facts without the generator, and so
that a facts file in any other format is refused before a model is loaded, naming the file, the
line and the fields it lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

FACTS_FILE = "facts.jsonl"


@dataclass(frozen=True, slots=True)
class Fact:
    """One queried fact: the prompt is `query`, the expected continuation `answer`."""

    entity: str
    family: str
    query: str  # "The atomic number of Iron is"
    answer: str  # " 26" (with its leading space, as it follows the query in the corpus)
    mentions: int  # documents that state the fact
    bucket: int  # 0 = most frequent fifth of its family, N_BUCKETS - 1 = rarest

    @property
    def statement(self) -> str:
        """The fact as every document that mentions it states it."""
        return f"{self.query}{self.answer}."

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Fact:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in raw]
        if missing:
            raise ValueError(f"a fact needs the fields {missing}: {dict(raw)}")
        return cls(**{n: raw[n] for n in names})


def load_facts(path: str | Path) -> list[Fact]:
    """The facts of a `facts.jsonl` written by `SynthCorpus.write`.

    Any other file is refused before a model is loaded, naming the file, the line and the fields.
    """
    path, types = Path(path), {f.name: {"str": str, "int": int}[str(f.type)] for f in fields(Fact)}
    needed = ", ".join(f"{name} ({kind.__name__})" for name, kind in types.items())
    expected = (
        f"expected one JSON object per line with {needed}, as `hmem synth` writes {FACTS_FILE}"
    )
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"facts file {path} {problem}; {expected}")
    facts = []
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError as exc:  # not JSON, or not UTF-8
                array = line.lstrip().startswith(b"[")
                what = (
                    "opens a JSON array"
                    if array
                    else f"is not valid JSON ({getattr(exc, 'msg', exc)})"
                )
                raise ValueError(f"{path}:{n} {what}; {expected}") from None
            values = raw if isinstance(raw, dict) else {}
            wrong = [k for k, t in types.items() if type(values.get(k)) is not t]
            if wrong:
                has = (
                    ", ".join(map(str, raw)) if isinstance(raw, dict) else f"a {type(raw).__name__}"
                )
                raise ValueError(
                    f"{path}:{n}: a fact needs the fields {needed}; missing or of another type "
                    f"here: {', '.join(wrong)} (the line has {has or 'no fields'})"
                )
            facts.append(Fact.from_dict(values))
    if not facts:
        raise ValueError(f"facts file {path} holds no facts; {expected}")
    return facts
