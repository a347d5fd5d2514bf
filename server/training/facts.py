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
OPTIONAL = ("query_form_seen",)


@dataclass(frozen=True, slots=True)
class Fact:
    """One queried fact: the prompt is `query`, the expected continuation `answer`."""

    entity: str
    family: str
    query: str  # "The atomic number of Iron is"
    answer: str  # " 26" (with its leading space, as it follows the query in the corpus)
    mentions: int  # documents that state the fact
    bucket: int  # 0 = most frequent fifth of its family, N_BUCKETS - 1 = rarest
    # Whether some document states the fact in the words it is asked in (None: not known).
    query_form_seen: bool | None = None

    @property
    def statement(self) -> str:
        """The fact as every document that mentions it states it."""
        return f"{self.query}{self.answer}."

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Fact:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in raw and n not in OPTIONAL]
        if missing:
            raise ValueError(f"a fact needs the fields {missing}: {dict(raw)}")
        return cls(**{n: raw[n] for n in names if n in raw})


# The required fields and their types (the OPTIONAL ones are checked by whoever sets them).
_TYPES: dict[str, type] = {
    f.name: {"str": str, "int": int}[str(f.type)] for f in fields(Fact) if f.name not in OPTIONAL
}


def facts_format() -> str:
    """What a `facts.jsonl` line holds, for error messages."""
    return ", ".join(f"{name} ({kind.__name__})" for name, kind in _TYPES.items())


def parse_json_line(path: Path, n: int, line: bytes, expected: str) -> Any:
    """Line `n` of `path` as JSON, or a ValueError naming the file, the line and `expected`."""
    try:
        return json.loads(line)
    except ValueError as exc:  # not JSON, or not UTF-8
        array = line.lstrip().startswith(b"[")
        what = "opens a JSON array" if array else f"is not valid JSON ({getattr(exc, 'msg', exc)})"
        raise ValueError(f"{path}:{n} {what}; {expected}") from None


def fact_from_json(path: Path, n: int, raw: Any) -> Fact:
    """A parsed `facts.jsonl` line as a `Fact`, or a ValueError naming what it lacks."""
    values = raw if isinstance(raw, dict) else {}
    wrong = [k for k, t in _TYPES.items() if type(values.get(k)) is not t]
    if wrong:
        has = ", ".join(map(str, raw)) if isinstance(raw, dict) else f"a {type(raw).__name__}"
        raise ValueError(
            f"{path}:{n}: a fact needs the fields {facts_format()}; missing or of another type "
            f"here: {', '.join(wrong)} (the line has {has or 'no fields'})"
        )
    return Fact.from_dict(values)


def load_facts(path: str | Path) -> list[Fact]:
    """The facts of a `facts.jsonl` written by `SynthCorpus.write`.

    Any other file is refused before a model is loaded, naming the file, the line and the fields.
    (`server.training.queries.load_queries` reads this format and plain query files alike.)
    """
    path = Path(path)
    expected = (
        f"expected one JSON object per line with {facts_format()}, as `hmem synth` writes "
        f"{FACTS_FILE}"
    )
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"facts file {path} {problem}; {expected}")
    facts = []
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                facts.append(fact_from_json(path, n, parse_json_line(path, n, line, expected)))
    if not facts:
        raise ValueError(f"facts file {path} holds no facts; {expected}")
    return facts
