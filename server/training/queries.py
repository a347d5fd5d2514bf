"""What `hmem eval` asks: `hmem synth`'s `facts.jsonl`, or a plain query file.

A plain query file is JSON Lines, one query per line:

    {"prompt": "The capital of France is", "answer": "Paris", "count": 5210, "family": "capital"}

`prompt` and `answer` (non-empty strings) are required. Optional: `bucket` (int >= 0, 0 = most
frequent) or `count` (int >= 0: how often the fact or its entity occurs, e.g. mentions in the
corpus or a popularity figure), `family` (str, default "queries"), `entity` (str, default the
prompt) and `query_form_seen` (bool: whether the corpus states the fact in the prompt's words).
Other keys are ignored. Each line becomes a `Fact`: query = prompt, mentions = count (0 if none).

Buckets are as given, on every line or on none. Without them, when lines have a count (then every
line needs one), each family's queries are put in fifths by count, most frequent first, ties in
file order (`frequency_buckets`, as `hmem synth` buckets its facts); with neither, every query is
in bucket 0.

The answer: a continuation is right when it starts with the answer (`evaluate.score`), so when the
prompt does not end in whitespace and the answer does not start with whitespace, one space is put
before the answer: "Paris" after "The capital of France is" is expected as " Paris".

A file's format is told from its first line: a `prompt` key makes it a plain query file; anything
else is read as `facts.jsonl`, whose lines must then all be facts (`server.training.facts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.training.facts import FACTS_FILE, Fact, fact_from_json, facts_format, parse_json_line
from server.training.synth import frequency_buckets

PLAIN_FORMAT = (
    '{"prompt": str, "answer": str} (optional: bucket or count (int), family, entity (str))'
)
DEFAULT_FAMILY = "queries"
# The optional fields of a plain line and their types (`bool` is not taken for an int).
_OPTIONAL: dict[str, type] = {
    "bucket": int,
    "count": int,
    "family": str,
    "entity": str,
    "query_form_seen": bool,
}


def spaced_answer(prompt: str, answer: str) -> str:
    """`answer` as it follows `prompt`: one space before it unless either side has whitespace."""
    if prompt[-1:].isspace() or answer[:1].isspace():
        return answer
    return " " + answer


def load_queries(path: str | Path) -> list[Fact]:
    """The facts of a `facts.jsonl` or of a plain query file, told apart by the first line.

    Anything else is refused before a model is loaded, in one line naming the file and the line.
    """
    path = Path(path)
    expected = (
        f"expected one JSON object per line with {facts_format()}, as `hmem synth` writes "
        f"{FACTS_FILE}, or a plain query file of {PLAIN_FORMAT} lines"
    )
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"facts file {path} {problem}; {expected}")
    lines: list[tuple[int, Any]] = []
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                lines.append((n, parse_json_line(path, n, line, expected)))
    if not lines:
        raise ValueError(f"facts file {path} holds no facts; {expected}")
    first = lines[0][1]
    if isinstance(first, dict) and "prompt" in first:
        return plain_facts(path, lines)
    return [fact_from_json(path, n, raw) for n, raw in lines]


def plain_facts(path: Path, lines: Sequence[tuple[int, Any]]) -> list[Fact]:
    """The parsed lines (line number, JSON value) of a plain query file as facts."""
    rows = [(n, _plain_row(path, n, raw)) for n, raw in lines]
    buckets = _buckets(path, rows)
    return [
        Fact(
            entity=row.get("entity", row["prompt"]),
            family=row.get("family", DEFAULT_FAMILY),
            query=row["prompt"],
            answer=spaced_answer(row["prompt"], row["answer"]),
            mentions=row.get("count", 0),
            bucket=bucket,
            query_form_seen=row.get("query_form_seen"),
        )
        for (_, row), bucket in zip(rows, buckets, strict=True)
    ]


def _plain_row(path: Path, n: int, raw: Any) -> dict[str, Any]:
    """A plain line's fields, checked: prompt and answer, and the optional ones it has."""
    where = f"{path}:{n}"
    if not isinstance(raw, dict):
        raise ValueError(
            f"{where}: a query is a JSON object, not a {type(raw).__name__}; expected "
            f"{PLAIN_FORMAT}"
        )
    wrong = [k for k in ("prompt", "answer") if type(raw.get(k)) is not str]
    if wrong:
        raise ValueError(
            f"{where}: a query needs prompt (str) and answer (str); missing or of another type "
            f"here: {', '.join(wrong)} (the line has {', '.join(map(str, raw)) or 'no fields'})"
        )
    empty = [k for k in ("prompt", "answer") if not raw[k].strip()]
    if empty:
        raise ValueError(f"{where}: {' and '.join(empty)} must not be empty or blank")
    for key, kind in _OPTIONAL.items():
        if key in raw and type(raw[key]) is not kind:
            raise ValueError(
                f"{where}: {key} must be {_a(kind)}, got {type(raw[key]).__name__} {raw[key]!r}"
            )
    negative = [k for k in ("bucket", "count") if raw.get(k, 0) < 0]
    if negative:
        raise ValueError(f"{where}: {negative[0]} must be >= 0, got {raw[negative[0]]}")
    return {k: raw[k] for k in ("prompt", "answer", *_OPTIONAL) if k in raw}


def _a(kind: type) -> str:
    return {int: "an integer", str: "a string", bool: "true or false"}[kind]


def _buckets(path: Path, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[int]:
    """Each row's bucket: as given, else fifths by count within its family, else 0."""
    key = "bucket" if any("bucket" in row for _, row in rows) else "count"
    first_n, first = rows[0]
    for n, row in rows:
        if (key in row) != (key in first):
            has, lacks = (n, first_n) if key in row else (first_n, n)
            why = "" if key == "bucket" else " (buckets are fifths by count)"
            raise ValueError(
                f"{path}:{n}: line {has} has a {key} and line {lacks} has none; give {key} on "
                f"every line or on none{why}"
            )
    if key == "bucket":
        return [row["bucket"] for _, row in rows]
    if "count" not in first:
        return [0] * len(rows)
    buckets = [0] * len(rows)
    families: dict[str, list[int]] = {}
    for i, (_, row) in enumerate(rows):
        families.setdefault(row.get("family", DEFAULT_FAMILY), []).append(i)
    for members in families.values():
        ranked = sorted(members, key=lambda i: -rows[i][1]["count"])  # stable: file order on ties
        for i, bucket in zip(ranked, frequency_buckets(len(ranked)), strict=True):
            buckets[i] = bucket
    return buckets
