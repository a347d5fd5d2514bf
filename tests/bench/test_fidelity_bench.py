"""Smoke test of bench.fidelity in quick mode: the tiny builds (FFN, LoRA, KV, half-width FFN,
and the default FFN with each other embedder) and their evaluations, end to end. The accuracies
are not checked (20 + 20 steps learn no facts); their shape, range and consistency are: the
blocking curve with nothing blocked is the default build's memory accuracy, fact by fact, and
with everything blocked the anchor's; blocking the best-matching subtree moves every fact off its
routed subtree; LoRA and KV fetch as many parameters as FFN; the int8 table's float32 variant
answers as `hmem eval` does, fact by fact, and int8 moves log-probabilities a little, not
nothing; table 6 routes every embedder's wording-disjoint queries, and a built bank routes them
as the routing-only measurement of its embedder does; a second run reuses every bank and reports
the same numbers; a run with `--only buckets,blocking` on the same work directory reuses the
default build's bank alone and writes tables 1 and 4 only, with the same numbers, and one with
`--only int8` reuses it and the int8 conversion. Without a build: --only picks the builds and
evaluations its tables need, and rejects an unknown table by naming the choices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fidelity.builds import TABLES as TABLE_NAMES
from bench.fidelity.builds import eval_tasks, plan_builds
from bench.fidelity.main import Corpus, base_settings, parse_args
from bench.fidelity.report import goals
from server.routing import EMBEDDERS
from server.training.pipeline import BuildSettings

ROOT = Path(__file__).resolve().parents[2]
PNGS = (
    "fidelity_buckets.png",
    "fidelity_types.png",
    "fidelity_size.png",
    "fidelity_blocking.png",
    "fidelity_int8.png",
    "fidelity_wording.png",
)
TABLES = (
    "| bucket | mentions | facts | memory | anchor | generic |",
    "| memory | width per level (neurons / rank / pairs) | fetched per path (per level) |",
    "| width scale | widths | fetched per path | % of anchor | memory: rarest |",
    "| blocked j | fraction of the bank | best-first: all | best-first: rarest |",
    "| bucket | mentions | facts | memory: float32 | memory: int8 | Δ | anchor: float32 |",
    "| bucket | hashed-tfidf: own words / new words |",
)
VARIANTS = ("float32", "int8", "bfloat16", "int8-bf16")
BRANCHING = 4  # --quick
# The builds of a full quick run: the four of tables 1-5, then the default with each other
# embedder (table 6), which the pipeline may refuse.
BUILDS = 4 + len(EMBEDDERS) - 1


def cells(tree: Any) -> Iterator[dict[str, Any]]:
    """Every accuracy cell ({"correct", "total", "accuracy"}) under `tree`."""
    if isinstance(tree, dict) and "accuracy" in tree and "total" in tree:
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from cells(value)


def untimed(tree: Any) -> Any:
    """`tree` without its seconds (table 6 keeps each embedder's time beside its accuracy)."""
    if isinstance(tree, dict):
        return {k: untimed(v) for k, v in tree.items() if not k.endswith("_s")}
    return tree


def predictions(bank: Path, label: str, mode: str = "memory") -> list[dict[str, Any]]:
    report = json.loads((bank.parent / f"eval-{label}.json").read_text())
    return [p for p in report["predictions"] if p["mode"] == mode]


def run(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bench.fidelity", "--quick", "--out", str(out)]
    cmd += flags
    env = os.environ | {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One quick run of all six tables (its banks under OUT/work); its stdout lines."""
    out = tmp_path_factory.mktemp("fidelity") / "out"
    return out, run(out).stdout.splitlines()


@pytest.mark.slow
def test_quick_run_reports_six_consistent_tables_and_plots(
    full_run: tuple[Path, list[str]],
) -> None:
    out, lines = full_run
    assert lines[0].startswith("machine:")
    assert lines[1].startswith("command: python")
    progress = [line for line in lines if re.match(rf"\[\d/{BUILDS}\] ", line)]
    assert len(progress) == BUILDS
    refused = [line for line in progress if ": not built: --embedder" in line]
    assert all(re.search(r"^\[\d/\d\] ffn-[a-z-]+: not built", line) for line in refused)
    assert all(re.search(r": built in \d+ s$", line) for line in progress if line not in refused)

    report = (out / "report.md").read_text()
    for head in TABLES:
        assert head in report
    for png in PNGS:
        assert (out / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert f"]({png})" in report
    data = json.loads((out / "fidelity.json").read_text())
    assert data["command"].startswith("python -m bench.fidelity --quick --out ")
    assert "--quick" in data["command"]
    assert data["settings"]["anchor_size"] == "tiny"
    acc = data["accuracy"]

    # Every cell of every table, a number in [0, 1] over some facts.
    assert set(acc) == {"by_bucket", "memory_types", "memory_size", "blocking", "int8", "wording"}
    assert set(acc["by_bucket"]) == {"memory", "anchor", "generic"}
    assert all(list(c) == ["0", "1", "2", "3", "4", "all"] for c in acc["by_bucket"].values())
    assert {k: list(c) for k, c in acc["memory_types"].items()} == {
        k: ["rarest", "rare", "all"] for k in ("ffn", "lora", "kv")
    }
    assert list(acc["memory_size"]) == ["ffn-x0.5", "ffn"]
    assert [list(c) for c in acc["blocking"].values()] == [["0", "1", "2", "3", "4"]] * 2
    assert list(acc["int8"]) == list(VARIANTS)
    assert all(list(v) == ["memory", "anchor"] for v in acc["int8"].values())
    found = list(cells({k: v for k, v in acc.items() if k != "wording"}))
    assert len(found) == 18 + 9 + 2 * 2 * 2 + 2 * 5 * 2 + 4 * 2 * 6
    found += check_wording(data, refused)
    for c in found:
        assert type(c["accuracy"]) is float
        assert 0.0 <= c["accuracy"] <= 1.0
        assert c["total"] > 0
        assert c["accuracy"] == c["correct"] / c["total"]
    assert all(type(check["holds"]) is bool for check in data["checks"])

    # The builds: equal fetched parameters, as `hmem build` itself counted them.
    builds = data["builds"]
    for b in builds.values():
        assert b["fetched_params"] == b["fetched_reported"] == sum(b["fetched_per_level"])
        assert not b["reused"]
    ffn = builds["ffn"]["fetched_params"]
    for kind in ("lora", "kv"):
        assert abs(builds[kind]["fetched_params"] - ffn) / ffn < 0.02
    assert builds["ffn-x0.5"]["widths"] == [w // 2 for w in builds["ffn"]["widths"]]

    # Blocking nothing is the default build's memory, everything blocked its anchor alone.
    best, by_bucket = acc["blocking"]["best"], acc["by_bucket"]
    rarest = str(data["rarest_bucket"])
    for j, mode in (("0", "memory"), (str(BRANCHING), "anchor")):
        assert best[j]["all"] == by_bucket[mode]["all"]
        assert best[j]["rarest"] == by_bucket[mode][rarest]
    bank = Path(builds["ffn"]["bank"])
    main, anchor = predictions(bank, "main"), predictions(bank, "main", "anchor")
    none, every = predictions(bank, "best-0"), predictions(bank, f"best-{BRANCHING}")
    assert [p["continuation"] for p in none] == [p["continuation"] for p in main]
    assert [p["path"] for p in none] == [p["path"] for p in main]
    assert [p["continuation"] for p in every] == [p["continuation"] for p in anchor]
    # j = 1 best-first blocks each fact's routed level-1 subtree; j = 1 at random only some.
    one = predictions(bank, "best-1")
    assert all(p["path"][0] != q["path"][0] for p, q in zip(one, main, strict=True))
    rand = predictions(bank, "random-1")
    moved = [p["path"][0] != q["path"][0] for p, q in zip(rand, main, strict=True)]
    assert 0 < sum(moved) < len(moved)

    # int8: the float32 variant is the model `hmem eval` scores; int8 one of its own.
    check_int8(data, bank)

    # Run again: every bank reused, the same numbers.
    lines = run(out).stdout.splitlines()
    progress = [line for line in lines if re.match(rf"\[\d/{BUILDS}\] ", line)]
    assert len(progress) == BUILDS
    assert all(": reused" in line or ": not built" in line for line in progress)
    again = json.loads((out / "fidelity.json").read_text())
    assert untimed(again["accuracy"]) == untimed(acc)
    assert all(b["reused"] for b in again["builds"].values())
    assert "not measured in this run" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_quick_only_buckets_and_blocking(full_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    """--only buckets,blocking on the full run's work directory: the default build alone (reused),
    tables 1 and 4 with the full run's numbers, nothing of tables 2 and 3."""
    full, _ = full_run
    whole = json.loads((full / "fidelity.json").read_text())
    out = tmp_path / "only"
    proc = run(out, "--only", "buckets,blocking", "--work", str(full / "work"))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine:")
    assert lines[1].startswith("command: python")
    progress = [line for line in lines if re.match(r"\[\d/\d\] ", line)]
    assert len(progress) == 1
    assert progress[0].startswith("[1/1] ffn (ffn, widths ")
    assert ": reused" in progress[0]

    report = (out / "report.md").read_text()
    for head, shown in zip(TABLES, (True, False, False, True, False, False), strict=True):
        assert (head in report) is shown
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["fidelity.json", "report.md", PNGS[0], PNGS[3]]
    )
    for png in (PNGS[0], PNGS[3]):
        assert (out / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert f"]({png})" in report
    for png in (PNGS[1], PNGS[2]):
        assert png not in report
    # The header stays: machine, command, corpus, settings.
    for start in ("- machine: ", "- command: `python ", "- corpus: ", "- build settings "):
        assert any(line.startswith(start) for line in report.splitlines()), start
    assert "- tables measured: 1 (buckets), 4 (blocking); not measured in this run: " in report
    # The goals, under tables 1 and 4: the numbers and met or not.
    goal1, goal4 = (
        next(line for line in report.splitlines() if line.startswith(f"Goal ({start}"))
        for start in ("rarest bucket: memory >= 4x", "blocking the best-matching level-1")
    )
    assert report.index(goal1) < report.index("## 4. Blocking") < report.index(goal4)
    got = json.loads((out / "fidelity.json").read_text())["goals"]
    g1, g4 = got["rarest_memory_vs_anchor"], got["blocked_best_subtree"]
    assert f"memory {100 * g1['memory']:.1f}%, anchor {100 * g1['anchor']:.1f}%" in goal1
    assert (
        f"rarest bucket {100 * g4['rarest_unblocked']:.1f}% -> {100 * g4['rarest']:.1f}%" in goal4
    )
    assert f"all facts {100 * g4['all_unblocked']:.1f}% -> {100 * g4['all']:.1f}%" in goal4
    for line, goal in ((goal1, g1), (goal4, g4)):
        assert ("**met**" if goal["met"] else "**not met**") in line

    data = json.loads(out.joinpath("fidelity.json").read_text())
    assert "--only buckets,blocking" in data["command"]
    assert data["settings"] == whole["settings"]
    assert data["tables"] == ["buckets", "blocking"]
    assert data["not_measured"] == ["types", "sizes", "int8", "wording"]
    assert list(data["builds"]) == ["ffn"]
    assert data["builds"]["ffn"]["bank"] == whole["builds"]["ffn"]["bank"]
    assert data["builds"]["ffn"]["reused"]
    acc = data["accuracy"]
    assert set(acc) == {"by_bucket", "blocking"}
    assert acc["by_bucket"] == whole["accuracy"]["by_bucket"]
    assert acc["blocking"] == whole["accuracy"]["blocking"]
    assert data["goals"] == {
        k: v for k, v in whole["goals"].items() if k not in ("int8", "wording")
    }
    assert set(data["goals"]) == {"rarest_memory_vs_anchor", "blocked_best_subtree"}
    # The checks: those of tables 1 and 4, as in the full run; those of 2 and 3 are not made.
    measured = {"memory beats", "blocking the best", "blocking 1/", "best-first below"}
    assert data["checks"] == [
        c for c in whole["checks"] if any(c["claim"].startswith(m) for m in measured)
    ]
    section = report.split("## Does the paper's ordering hold here?")[1]
    skipped = [line for line in section.splitlines() if "not measured in this run" in line]
    assert [line.split(":")[0] for line in skipped] == [
        "- FFN > LoRA > KV at equal fetched parameters (§2.4)",
        "- more memory is better",
    ]
    assert "%" not in "".join(skipped)  # no value for what was not measured


def check_wording(data: dict[str, Any], refused: list[str]) -> list[dict[str, Any]]:
    """Table 6 of a quick run: every embedder routed, in the corpus's words and in new ones; an
    embedder built routes its bank's queries as its routing-only measurement did (one seed: the
    build's), one refused says why; the queries share no word with the corpus but the entity's
    name; the goal names the best. Returns the table's accuracy cells."""
    t6, builds = data["accuracy"]["wording"], data["builds"]
    assert list(t6["embedders"]) == list(EMBEDDERS)
    assert t6["asked"] == data["corpus"]["facts"]
    assert not t6["unasked"]
    refused_names = {line.split("] ")[1].split(":")[0] for line in refused}
    assert set(data["unbuilt"]) == refused_names
    for name, e in t6["embedders"].items():
        assert e["seeds"] == [0]
        assert e["embed_s"] > 0
        assert e["unheld"] == 0  # every fact is stated by some text the build trains on
        build = e["build"]
        assert build == ("ffn" if e["default"] else f"ffn-{name}")
        if build in refused_names:
            assert "error" in e
            assert "answers" not in e
            continue
        assert builds[build]["bank"].endswith("/bank")
        leaf = e["routing"]["disjoint"]["leaf"]
        assert e["bank_routing"] == leaf["buckets"] | {
            k: leaf[k] for k in ("all", "rarest", "rare")
        }
        assert set(e["answers"]) == {"memory", "anchor"}
    best = t6["best"]
    routed = data["goals"]["wording"]["routed"]
    assert routed[best] == max(routed.values())
    assert data["goals"]["wording"]["met"] == (best == t6["default"])
    lines = Path(data["corpus"]["corpus"]).read_text().splitlines()
    corpus = [json.loads(line)["text"] for line in lines if line.strip()]
    seen = {w for text in corpus for w in re.findall(r"\w+", text.lower())}
    asked = predictions(Path(builds["ffn"]["bank"]), "disjoint")
    assert len(asked) == data["corpus"]["facts"]
    for p in asked:
        name = set(re.findall(r"\w+", p["entity"].lower()))
        assert not (set(re.findall(r"\w+", p["query"].lower())) - name) & seen
    return list(cells(t6))


def check_int8(data: dict[str, Any], bank: Path) -> None:
    """Table 5 of a quick run: the float32 variant answers as table 1's evaluation did, fact by
    fact; both accuracies computed for every variant; int8 against float moves the chosen
    tokens' log-probabilities a little (finite, above zero, well under a nat)."""
    t5, info = data["accuracy"]["int8"], data["int8"]
    by_bucket = data["accuracy"].get("by_bucket")
    for mode in ("memory", "anchor"):
        if by_bucket is not None:
            assert t5["float32"][mode] == by_bucket[mode]
        ours = predictions(bank, "int8-float32", mode)
        theirs = predictions(bank, "main", mode)
        assert [p["continuation"] for p in ours] == [p["continuation"] for p in theirs]
        assert [p["path"] for p in ours] == [p["path"] for p in theirs]
        for variant in VARIANTS:
            assert len(predictions(bank, f"int8-{variant}", mode)) == data["corpus"]["facts"]
    int8_bank = Path(info["bank_int8"])
    assert int8_bank == bank.parent / "bank-int8"
    assert json.loads((int8_bank / "manifest.json").read_text())["dtype"] == "int8"
    conv = info["convert"]
    assert 0 < conv["int8_bytes"] < conv["float_bytes"] / 2
    assert [info["variants"][v]["weights"] for v in VARIANTS] == ["float", "int8"] * 2
    assert list(info["pairs"]) == ["float32", "bfloat16"]
    for pair in info["pairs"].values():
        for mode in ("memory", "anchor"):
            changed = pair["changed"][mode]
            assert changed["facts"] == data["corpus"]["facts"]
            assert changed["now_right"] + changed["now_wrong"] <= changed["changed"]
            for kind in ("greedy", "answer"):
                lp = pair["logprobs"][mode][kind]
                assert lp["tokens"] > 0
                assert 0.0 < lp["mean"] <= lp["max"] < 1.0
                assert lp["mean"] < 0.05
    goals = data["goals"]["int8"]
    assert list(goals) == ["float32", "bfloat16"]
    for pair, g in goals.items():
        means = {m: info["pairs"][pair]["logprobs"][m]["greedy"]["mean"] for m in g["logprob_mean"]}
        assert g["logprob_mean"] == means
        assert g["met"] == (g["logprob_met"] and g["buckets_met"])


@pytest.mark.slow
def test_quick_only_int8(full_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    """--only int8 on the full run's work directory: the default build and its int8 conversion
    reused, table 5 alone, with the full run's numbers; the report gives both accuracies and the
    log-probability differences."""
    full, _ = full_run
    whole = json.loads((full / "fidelity.json").read_text())
    out = tmp_path / "int8"
    lines = run(out, "--only", "int8", "--work", str(full / "work")).stdout.splitlines()
    progress = [line for line in lines if re.match(r"\[\d/\d\] ", line)]
    assert len(progress) == 1
    assert ": reused" in progress[0]
    data = json.loads((out / "fidelity.json").read_text())
    assert data["tables"] == ["int8"]
    assert set(data["accuracy"]) == {"int8"}
    assert data["accuracy"]["int8"] == whole["accuracy"]["int8"]
    assert data["int8"]["pairs"] == whole["int8"]["pairs"]
    assert data["int8"]["convert"]["reused"]
    assert data["goals"] == {"int8": whole["goals"]["int8"]}
    check_int8(data, Path(data["builds"]["ffn"]["bank"]))
    report = (out / "report.md").read_text()
    assert TABLES[4] in report
    assert "| bucket | mentions | facts | memory: bfloat16 | memory: int8-bf16 | Δ |" in report
    assert "| activations | mode | chosen tokens: mean / max (tokens) |" in report
    assert sum(line.startswith("Goal (int8 against ") for line in report.splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["fidelity.json", PNGS[4], "report.md"]


def test_goals_are_computed_from_the_cells() -> None:
    """The issue's goals of tables 1 and 4: rarest bucket memory >= 4x the anchor and >= 60%;
    j = 1 best-first blocking brings the rarest bucket to <= 25%."""

    def c(correct: int, total: int) -> dict[str, Any]:
        return {"correct": correct, "total": total, "accuracy": correct / total}

    def table1(memory: dict[str, Any], anchor: dict[str, Any]) -> dict[str, Any]:
        return {"by_bucket": {"memory": {"4": memory}, "anchor": {"4": anchor}}}

    met = goals(table1(c(3, 5), c(0, 5)), 4)["rarest_memory_vs_anchor"]
    assert (met["ratio"], met["ratio_met"], met["memory_met"], met["met"]) == (
        None,
        True,
        True,
        True,
    )
    low = goals(table1(c(4, 5), c(1, 4)), 4)["rarest_memory_vs_anchor"]
    assert low["ratio"] == pytest.approx(3.2)
    assert (low["ratio_met"], low["memory_met"], low["met"]) == (False, True, False)
    none = goals(table1(c(0, 5), c(0, 5)), 4)["rarest_memory_vs_anchor"]
    assert not none["ratio_met"]
    assert not none["met"]

    def table4(rarest: dict[str, Any]) -> dict[str, Any]:
        one = {"all": c(2, 10), "rarest": rarest}
        return {"blocking": {"best": {"0": {"all": c(7, 10), "rarest": c(4, 5)}, "1": one}}}

    assert goals(table4(c(1, 4)), 4)["blocked_best_subtree"]["met"]
    assert not goals(table4(c(2, 5)), 4)["blocked_best_subtree"]["met"]
    # Not met either where the rarest bucket was at <= 25% with nothing blocked.
    never = table4(c(0, 4))
    never["blocking"]["best"]["0"]["rarest"] = c(1, 4)
    assert not goals(never, 4)["blocked_best_subtree"]["above_unblocked"]
    assert not goals(never, 4)["blocked_best_subtree"]["met"]
    assert goals({}, 4) == {}


def test_int8_goals_are_computed_from_the_cells() -> None:
    """Table 5's goals, per pair: the chosen tokens' mean |logprob difference| <= 0.02 with
    memory and the anchor alone, and every bucket with memory within 2 points of float."""

    def c(correct: int, total: int) -> dict[str, Any]:
        return {"correct": correct, "total": total, "accuracy": correct / total}

    def lp(memory: float, anchor: float) -> dict[str, Any]:
        return {m: {"greedy": {"mean": x}} for m, x in (("memory", memory), ("anchor", anchor))}

    ref = {"memory": {"0": c(50, 100), "all": c(50, 100)}, "anchor": {"0": c(9, 100)}}
    q = {"memory": {"0": c(52, 100), "all": c(52, 100)}, "anchor": {"0": c(4, 100)}}
    accuracy = {"int8": {"float32": ref, "int8": q}}
    pair = {"reference": "float32", "int8": "int8"}
    summary = {"pairs": {"float32": pair | {"logprobs": lp(0.019, 0.02)}}}
    g = goals(accuracy, 4, summary)["int8"]["float32"]
    assert g["worst_points"] == {"memory": pytest.approx(2.0), "anchor": pytest.approx(5.0)}
    assert g["points"]["anchor"]["0"] == pytest.approx(-5.0)
    assert (g["logprob_met"], g["buckets_met"], g["anchor_buckets_met"], g["met"]) == (
        True,
        True,
        False,
        True,
    )
    summary["pairs"]["float32"]["logprobs"] = lp(0.01, 0.021)
    assert not goals(accuracy, 4, summary)["int8"]["float32"]["met"]
    summary["pairs"]["float32"]["logprobs"] = lp(0.01, 0.01)
    q["memory"]["0"] = c(47, 100)
    g = goals(accuracy, 4, summary)["int8"]["float32"]
    assert (g["logprob_met"], g["buckets_met"], g["met"]) == (True, False, False)


def test_only_plans_the_builds_and_evaluations_of_its_tables(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "x"}\n')
    widths = BuildSettings.default_widths(2)
    base = BuildSettings(
        corpus=corpus, out=Path(), levels=2, widths=widths, branching=4, anchor_size="tiny"
    )
    facts, rare = tmp_path / "facts.jsonl", (3, 4)

    def planned(tables: tuple[str, ...]) -> dict[str, list[str]]:
        plans = plan_builds(base, (0.5, 1.0), tmp_path, tables)
        return {
            n: [t.label for t in eval_tasks(p, facts, rare, 0, tables)] for n, p in plans.items()
        }

    blocking = [*(f"best-{j}" for j in range(5)), *(f"random-{j}" for j in range(1, 4))]
    assert planned(("buckets", "blocking")) == {"ffn": ["main", *blocking]}
    assert planned(("types",)) == {"ffn": ["main"], "lora": ["main"], "kv": ["main"]}
    assert planned(("sizes",)) == {"ffn": ["main"], "ffn-x0.5": ["main"]}
    others = [f"ffn-{e}" for e in EMBEDDERS if e != base.embedder]
    assert list(planned(TABLE_NAMES)) == ["ffn", "lora", "kv", "ffn-x0.5", *others]
    # Table 6: the default build with each other embedder, each asked its own queries; the
    # wording-disjoint ones only where the corpus's facts could be so asked.
    assert planned(("wording",)) == {"ffn": ["main"]} | {n: ["main"] for n in others}
    disjoint = tmp_path / "disjoint.jsonl"
    plans = plan_builds(base, (1.0,), tmp_path, ("wording",))
    assert {n: p.settings.embedder for n, p in plans.items()} == {"ffn": base.embedder} | {
        f"ffn-{e}": e for e in EMBEDDERS if e != base.embedder
    }
    assert [p.optional for p in plans.values()] == [False] + [True] * len(others)
    for plan in plans.values():
        tasks = eval_tasks(plan, facts, rare, 0, ("wording",), disjoint)
        assert [(t.label, t.facts, t.routed) for t in tasks] == [
            ("main", facts, None),
            ("disjoint", disjoint, plan.settings),
        ]
    # The default build's main evaluation: the generic memory only for table 1.
    ffn = plan_builds(base, (1.0,), tmp_path, ("types",))["ffn"]
    assert eval_tasks(ffn, facts, rare, 0, ("types",))[0].modes == ("memory", "anchor")
    assert eval_tasks(ffn, facts, rare, 0, ("buckets",))[0].modes == (
        "memory",
        "anchor",
        "generic",
    )


def test_only_parses_and_rejects_unknown_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([]).only == TABLE_NAMES
    assert parse_args(["--only", "blocking, buckets"]).only == ("buckets", "blocking")
    for bad in ("buckets,bogus", ","):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--only", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --only" in err
        assert "buckets, types, sizes, blocking" in err
        assert ("'bogus'" in err) is (bad != ",")


def test_anchor_makes_every_build_train_memories_on_that_checkpoint(tmp_path: Path) -> None:
    """`--anchor DIR`: the bench measures memories post hoc on a user's checkpoint (the
    wording-disjoint figures with an anchor that knows language), every build frozen on it."""
    args = parse_args(["--anchor", str(tmp_path / "ckpt"), "--only", "types,wording"])
    base = base_settings(args, Corpus(tmp_path / "corpus.jsonl", tmp_path / "facts.jsonl", {}))
    assert base.anchor_dir == tmp_path / "ckpt"
    assert base.freeze_anchor
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
    plans = plan_builds(base, (1.0,), tmp_path, args.only)
    assert {p.settings.anchor_dir for p in plans.values()} == {tmp_path / "ckpt"}
    assert parse_args([]).anchor is None
