"""Plain query files for `hmem eval`: reading them, refusing what is not one, and the report.

The files are real files in tmp_path; reading them loads no model, and the report is built from
hand-made predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from server.defaults import DEMO_BANK
from server.training.facts import Fact, load_facts
from server.training.queries import load_queries, spaced_answer
from server.training.report import EvalReport, Prediction
from server.training.synth import generate_corpus


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "answer", "expected"),
    [
        ("The capital of France is", "Paris", " Paris"),
        ("The capital of France is", " Paris", " Paris"),  # already spaced
        ("The capital of France is ", "Paris", "Paris"),  # the prompt ends in the space
        ("Q: capital of France?\nA:", "Paris", " Paris"),
        ("Q: capital of France?\nA:\n", "Paris", "Paris"),
        ("Iron:", "\t26", "\t26"),
    ],
)
def test_an_answer_gets_one_space_unless_either_side_has_whitespace(
    prompt: str, answer: str, expected: str
) -> None:
    assert spaced_answer(prompt, answer) == expected


def test_plain_rows_become_facts(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "q.jsonl",
        [
            {"prompt": "The capital of France is", "answer": "Paris"},
            {"prompt": "Iron's atomic number is", "answer": " 26", "family": "element",
             "entity": "Iron", "id": 7},  # an unknown key is ignored
            {"prompt": "Tupo Methu was born in ", "answer": "1766", "query_form_seen": False},
        ],
    )  # fmt: skip
    assert load_queries(path) == [
        Fact("The capital of France is", "queries", "The capital of France is", " Paris", 0, 0),
        Fact("Iron", "element", "Iron's atomic number is", " 26", 0, 0),
        Fact("Tupo Methu was born in ", "queries", "Tupo Methu was born in ", "1766", 0, 0, False),
    ]


def test_buckets_are_given_or_fifths_by_count_within_each_family(tmp_path: Path) -> None:
    given = write_lines(
        tmp_path / "given.jsonl",
        [{"prompt": f"p{i}", "answer": "a", "bucket": b} for i, b in enumerate([4, 0, 7])],
    )
    assert [f.bucket for f in load_queries(given)] == [4, 0, 7]
    assert [f.mentions for f in load_queries(given)] == [0, 0, 0]

    # Ten "x" rows (ties keep file order) and five "y" rows, most frequent first.
    counts = [5, 9, 1, 5, 0, 3, 8, 7, 2, 5]
    rows = [
        {"prompt": f"x{i}", "answer": "a", "count": c, "family": "x"} for i, c in enumerate(counts)
    ]
    rows += [
        {"prompt": f"y{i}", "answer": "a", "count": c, "family": "y"}
        for i, c in enumerate([1, 50, 2, 40, 3])
    ]
    facts = load_queries(write_lines(tmp_path / "counted.jsonl", rows))
    # x by count: 9 (x1), 8 (x6), 7 (x7), 5 (x0), 5 (x3), 5 (x9), 3 (x5), 2 (x8), 1 (x2), 0 (x4)
    assert [f.bucket for f in facts[:10]] == [1, 0, 4, 2, 4, 3, 0, 1, 3, 2]
    assert [f.bucket for f in facts[10:]] == [4, 0, 3, 1, 2]
    assert [f.mentions for f in facts] == [*counts, 1, 50, 2, 40, 3]

    # A bucket wins over a count.
    both = [{"prompt": "p", "answer": "a", "bucket": 3, "count": 100}]
    assert load_queries(write_lines(tmp_path / "both.jsonl", both))[0].bucket == 3
    plain = [{"prompt": f"p{i}", "answer": "a"} for i in range(7)]
    unbucketed = load_queries(write_lines(tmp_path / "plain.jsonl", plain))
    assert {f.bucket for f in unbucketed} == {0}


def test_a_facts_file_is_read_as_hmem_synth_wrote_it(tmp_path: Path) -> None:
    corpus = generate_corpus(seed=0)
    corpus.write(tmp_path)
    assert load_queries(tmp_path / "facts.jsonl") == load_facts(tmp_path / "facts.jsonl")
    assert load_queries(tmp_path / "facts.jsonl") == corpus.facts


OK = {"prompt": "The capital of France is", "answer": "Paris"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(OK), "{oops"], r"q\.jsonl:2 is not valid JSON \(Expecting property name"),
        ([json.dumps(OK), "[1, 2]"], r"q\.jsonl:2: a query is a JSON object, not a list"),
        ([json.dumps(OK), '"Paris"'], r"q\.jsonl:2: a query is a JSON object, not a str"),
        ([json.dumps(OK), json.dumps({"prompt": "x"})],
         r"q\.jsonl:2: a query needs prompt \(str\) and answer \(str\); missing or of another "
         r"type here: answer \(the line has prompt\)"),
        ([json.dumps({"prompt": 3, "answer": 26})],
         r"q\.jsonl:1: a query needs .* here: prompt, answer \(the line has prompt, answer\)"),
        ([json.dumps({"prompt": "x", "answer": " "})],
         r"q\.jsonl:1: answer must not be empty or blank"),
        ([json.dumps(OK | {"bucket": "4"})], r"q\.jsonl:1: bucket must be an integer, got str '4'"),
        ([json.dumps(OK | {"bucket": True})], r"q\.jsonl:1: bucket must be an integer, got bool"),
        ([json.dumps(OK | {"count": 2.5})], r"q\.jsonl:1: count must be an integer, got float"),
        ([json.dumps(OK | {"count": -1})], r"q\.jsonl:1: count must be >= 0, got -1"),
        ([json.dumps(OK | {"family": 1})], r"q\.jsonl:1: family must be a string, got int"),
        ([json.dumps(OK | {"query_form_seen": 1})],
         r"q\.jsonl:1: query_form_seen must be true or false"),
        ([json.dumps(OK | {"bucket": 1}), "", json.dumps(OK)],
         r"q\.jsonl:3: line 1 has a bucket and line 3 has none; give bucket on every line or "
         r"on none"),
        ([json.dumps(OK), json.dumps(OK | {"bucket": 1})],
         r"q\.jsonl:2: line 2 has a bucket and line 1 has none"),
        ([json.dumps(OK | {"count": 1}), json.dumps(OK)],
         r"q\.jsonl:2: line 1 has a count and line 2 has none; .*\(buckets are fifths by count\)"),
        (["", "  "], r"facts file .*q\.jsonl holds no facts; expected one JSON object per line "
                     r"with entity \(str\), .* or a plain query file of \{\"prompt\": str"),
    ],
)  # fmt: skip
def test_a_bad_query_file_is_refused_naming_the_file_and_line(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as caught:
        load_queries(path)
    assert "\n" not in str(caught.value)


def test_a_directory_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"facts file .* is a directory; expected .* plain query"):
        load_queries(tmp_path)
    with pytest.raises(ValueError, match=r"facts file .*nope\.jsonl does not exist"):
        load_queries(tmp_path / "nope.jsonl")


def test_a_facts_file_line_with_a_prompt_later_is_refused_as_a_fact(tmp_path: Path) -> None:
    fact = {"entity": "Iron", "family": "element", "query": "The atomic number of Iron is",
            "answer": " 26", "mentions": 3, "bucket": 0}  # fmt: skip
    path = write_lines(tmp_path / "mixed.jsonl", [fact, OK])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: a fact needs the fields"):
        load_queries(path)


# -- the report -----------------------------------------------------------------------------------


def report_of(facts: list[Fact], right: list[bool]) -> EvalReport:
    """Both modes ask every fact; "memory" gets `right`, "anchor" none."""
    modes = ("memory", "anchor")
    predictions = [
        Prediction(fact=f, mode=m, continuation="", correct=ok and m == "memory")
        for m in modes
        for f, ok in zip(facts, right, strict=True)
    ]
    return EvalReport(bank="b", modes=modes, predictions=predictions)


def table_rows(table: str, section: str) -> list[str]:
    part = table.split(section, 1)[1].split("###", 1)[0]
    return [line for line in part.splitlines() if line.startswith("| ")]


def test_the_report_shows_only_buckets_that_hold_facts(tmp_path: Path) -> None:
    plain = [{"prompt": f"p{i}", "answer": "a"} for i in range(4)]
    facts = load_queries(write_lines(tmp_path / "q.jsonl", plain))
    report = report_of(facts, [True, False, True, True])
    table = report.table()
    assert "### element" not in table
    assert "by query form" not in table
    assert table_rows(table, "### all families (4 facts)") == [
        "| bucket | memory | anchor |",  # no counts: no mentions column
        "| --- | --- | --- |",
        "| 0 | 75.0% (3/4) | 0.0% (0/4) |",
        "| all | 75.0% (3/4) | 0.0% (0/4) |",
    ]
    data = report.as_dict()
    assert data["buckets"] == [0]
    assert list(data["accuracy"]["memory"]["queries"]) == ["0", "all"]
    assert data["by_query_form"] is None

    counted = [{"prompt": f"p{i}", "answer": "a", "count": 10 - i} for i in range(3)]
    table = report_of(load_queries(write_lines(tmp_path / "c.jsonl", counted)), [True] * 3).table()
    assert [r.split(" | ")[:2] for r in table_rows(table, "### all families")[2:]] == [
        ["| 0", "10"], ["| 1", "9"], ["| 3", "8"], ["| all", "10-8"]
    ]  # fmt: skip


def test_the_rarest_two_buckets_are_split_by_query_form(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p0", "answer": "a", "bucket": 0, "query_form_seen": False},
        {"prompt": "p1", "answer": "a", "bucket": 2, "query_form_seen": True},
        {"prompt": "p2", "answer": "a", "bucket": 2, "query_form_seen": False},
        {"prompt": "p3", "answer": "a", "bucket": 3, "query_form_seen": True},
        {"prompt": "p4", "answer": "a", "bucket": 3},  # not known: in neither row
        {"prompt": "p5", "answer": "a", "bucket": 3, "query_form_seen": False},
    ]
    facts = load_queries(write_lines(tmp_path / "q.jsonl", rows))
    report = report_of(facts, [True, True, False, True, True, True])
    assert table_rows(report.table(), "### buckets 2, 3 by query form (4 facts)") == [
        "| query form | memory | anchor |",
        "| --- | --- | --- |",
        "| form seen | 100.0% (2/2) | 0.0% (0/2) |",
        "| form not seen | 50.0% (1/2) | 0.0% (0/2) |",
    ]
    by_form = report.as_dict()["by_query_form"]
    assert by_form["buckets"] == [2, 3]
    assert by_form["accuracy"]["memory"] == {
        "seen": {"correct": 2, "total": 2, "accuracy": 1.0},
        "not_seen": {"correct": 1, "total": 2, "accuracy": 0.5},
    }
    assert report.as_dict()["predictions"][0]["query_form_seen"] is False


# -- the command ----------------------------------------------------------------------------------


def test_hmem_eval_reads_a_plain_query_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"prompt": f"The atomic number of {e} is", "answer": n, "count": c}
            for e, n, c in (("Iron", "26", 90), ("Neon", "10", 40), ("Tin", "50", 5))]  # fmt: skip
    queries = write_lines(tmp_path / "q.jsonl", rows)
    report = tmp_path / "r.json"
    argv = ["eval", "--bank", str(DEMO_BANK), "--queries", str(queries), "--modes", "anchor"]
    assert main([*argv, "--json", str(report), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "### all families (3 facts)" in out
    assert "| bucket | mentions | anchor |" in out
    data = json.loads(report.read_text())
    assert [p["answer"] for p in data["predictions"]] == [" 26", " 10", " 50"]
    assert data["buckets"] == [0, 1, 3]

    assert main(["eval", "--bank", str(DEMO_BANK), "--queries", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_hmem_eval_help_names_both_formats_and_the_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--facts FACTS, --queries FACTS" in out
    assert "plain query file" in out
    assert "one space is put before the answer" in out
    assert "(default: memory,anchor,generic)" in out
