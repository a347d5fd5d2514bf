"""The report of a long-tail evaluation: each prediction, and accuracy by mode, family and bucket.

`EvalReport.table` is markdown, `EvalReport.as_dict` the same numbers and every prediction as
JSON. Buckets are those that hold facts (0 = most frequent); when the facts say whether the corpus
states them in their query's words (`Fact.query_form_seen`), the two rarest buckets are also
split by that: how paraphrased corpora are diagnosed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.training.facts import Fact


@dataclass(frozen=True, slots=True)
class Prediction:
    """One fact asked in one mode."""

    fact: Fact
    mode: str
    continuation: str
    correct: bool
    path: tuple[int, ...] | None = None  # node id per memory level ("memory" mode only)


@dataclass(frozen=True, slots=True)
class Tally:
    correct: int
    total: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def cell(self) -> str:
        acc = self.accuracy
        return "-" if acc is None else f"{100 * acc:.1f}% ({self.correct}/{self.total})"

    def as_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "total": self.total, "accuracy": self.accuracy}


# The rows of the query-form split: label, and the `Fact.query_form_seen` it counts.
QUERY_FORMS = (("form seen", True), ("form not seen", False))


@dataclass(frozen=True)
class EvalReport:
    """Every prediction, and accuracy by mode x family x bucket drawn from them."""

    bank: str
    modes: tuple[str, ...]
    predictions: list[Prediction]

    @property
    def families(self) -> list[str]:
        """Families in the order the facts list them."""
        return list(dict.fromkeys(p.fact.family for p in self.predictions))

    @property
    def buckets(self) -> list[int]:
        """The buckets that hold facts, most frequent (0) first."""
        return sorted({p.fact.bucket for p in self.predictions})

    @property
    def rarest_buckets(self) -> list[int]:
        """The two rarest buckets that hold facts (one, if only one does)."""
        return self.buckets[-2:]

    @property
    def knows_query_form(self) -> bool:
        """Whether some fact says if the corpus states it in its query's words."""
        return any(p.fact.query_form_seen is not None for p in self.predictions)

    def _tally(self, mode: str, keep: Callable[[Fact], bool]) -> Tally:
        hits = [p.correct for p in self.predictions if p.mode == mode and keep(p.fact)]
        return Tally(correct=sum(hits), total=len(hits))

    def tally(self, mode: str, *, family: str | None = None, bucket: int | None = None) -> Tally:
        """Correct and total facts of `mode`, within one family and bucket, or pooled (None)."""
        return self._tally(
            mode,
            lambda f: (
                (family is None or f.family == family) and (bucket is None or f.bucket == bucket)
            ),
        )

    def form_tally(self, mode: str, *, seen: bool) -> Tally:
        """`mode` on the rarest two buckets' facts whose query form the corpus does (not) state."""
        rare = self.rarest_buckets
        return self._tally(mode, lambda f: f.bucket in rare and f.query_form_seen is seen)

    def _facts(self, family: str | None, bucket: int | None) -> list[Fact]:
        mode = self.modes[0]
        return [
            p.fact
            for p in self.predictions
            if p.mode == mode
            and (family is None or p.fact.family == family)
            and (bucket is None or p.fact.bucket == bucket)
        ]

    def _mentions(self, family: str | None, bucket: int | None) -> str:
        mentions = [f.mentions for f in self._facts(family, bucket)]
        if not mentions:
            return ""
        most, least = max(mentions), min(mentions)
        return str(most) if most == least else f"{most}-{least}"

    def _section(self, title: str, family: str | None) -> list[str]:
        # Without counts (a plain query file that gives none) every fact has 0 mentions: no column.
        counted = any(p.fact.mentions for p in self.predictions)
        head = ["bucket", *(["mentions"] if counted else []), *self.modes]
        lines = [
            f"### {title} ({len(self._facts(family, None))} facts)",
            "",
            "| " + " | ".join(head) + " |",
            "| " + " | ".join("---" for _ in head) + " |",
        ]
        for bucket in [*self.buckets, None]:
            label = "all" if bucket is None else str(bucket)
            span = [self._mentions(family, bucket)] if counted else []
            cells = [self.tally(m, family=family, bucket=bucket).cell() for m in self.modes]
            lines.append("| " + " | ".join([label, *span, *cells]) + " |")
        return lines

    def _form_section(self) -> list[str]:
        rare = self.rarest_buckets
        n = sum(self.form_tally(self.modes[0], seen=seen).total for _, seen in QUERY_FORMS)
        lines = [
            f"### buckets {', '.join(map(str, rare))} by query form ({n} facts)",
            "",
            "| query form | " + " | ".join(self.modes) + " |",
            "| --- | " + " | ".join("---" for _ in self.modes) + " |",
        ]
        for label, seen in QUERY_FORMS:
            cells = [self.form_tally(m, seen=seen).cell() for m in self.modes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines

    def table(self) -> str:
        """Markdown: accuracy per bucket (0 = most frequent) and mode, elements first, then all;
        then, when the facts say whether the corpus states them in their query's words, the
        rarest two buckets split by that."""
        lines: list[str] = []
        if "element" in self.families:
            lines += [*self._section("element", "element"), ""]
        lines += self._section("all families", None)
        if self.knows_query_form:
            lines += ["", *self._form_section()]
        return "\n".join(lines) + "\n"

    def _by_query_form(self) -> dict[str, Any] | None:
        if not self.knows_query_form:
            return None
        return {
            "buckets": self.rarest_buckets,
            "accuracy": {
                mode: {
                    "seen": self.form_tally(mode, seen=True).as_dict(),
                    "not_seen": self.form_tally(mode, seen=False).as_dict(),
                }
                for mode in self.modes
            },
        }

    def as_dict(self) -> dict[str, Any]:
        """Accuracy as `[mode][family or "all"][bucket or "all"]`, the rarest two buckets by
        query form (`by_query_form`, None when the facts do not say), and every prediction."""
        accuracy = {
            mode: {
                "all" if family is None else family: {
                    "all" if bucket is None else str(bucket): self.tally(
                        mode, family=family, bucket=bucket
                    ).as_dict()
                    for bucket in [*self.buckets, None]
                }
                for family in [*self.families, None]
            }
            for mode in self.modes
        }
        return {
            "bank": self.bank,
            "modes": list(self.modes),
            "n_facts": len(self._facts(None, None)),
            "buckets": self.buckets,
            "accuracy": accuracy,
            "by_query_form": self._by_query_form(),
            "predictions": [_prediction_dict(p) for p in self.predictions],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n"


def _prediction_dict(p: Prediction) -> dict[str, Any]:
    return {
        "entity": p.fact.entity,
        "family": p.fact.family,
        "query": p.fact.query,
        "bucket": p.fact.bucket,
        "mentions": p.fact.mentions,
        "query_form_seen": p.fact.query_form_seen,
        "mode": p.mode,
        "answer": p.fact.answer,
        "continuation": p.continuation,
        "correct": p.correct,
        "path": None if p.path is None else list(p.path),
    }
