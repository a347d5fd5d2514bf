"""How `.ci/run` shares the suite out between pytest-xdist workers (`-n 2 --dist loadfile`).

A work unit is a test file, so that a module-scoped fixture (a bench run, a live server, a Ray
cluster) is built once, as in a run without workers; but the files that start a local Ray cluster
are one unit, run one after the other: two Ray clusters at once on one machine disturb each other
(one's Serve controller was killed under the other's tests).

The units are handed out in collection order, one or two ahead per worker, so the longest ones
go first (`LONGEST`): otherwise one could start last and leave the other worker idle at the end.
A run without workers keeps pytest's order.
"""

from __future__ import annotations

from typing import Any

import pytest

# Test files that start a local Ray cluster (`ray.init`), and the unit they share.
RAY = "ray"
ONE_UNIT = {
    "tests/bench/test_cluster_bench.py": RAY,
    "tests/server/cluster/test_ray_cluster.py": RAY,
}
# The longest units, longest first (seconds under `-n 2` on a 2-core machine, from --durations;
# the rest take a few seconds each).
LONGEST = (
    RAY,  # ~160: the cluster bench (~105), the Ray cluster tests (~55); slower beside a worker
    "tests/server/training/test_paraphrase_recall.py",  # ~105: trains a tiny bank
    "tests/server/model/test_families.py",  # ~70: every family against transformers
    "tests/server/training/test_pretrain.py",  # ~45: tiny pretrains, one killed and resumed
    "tests/bench/test_fidelity_bench.py",  # ~35: four tiny builds, then two more runs
    "tests/bench/test_soak_bench.py",  # ~35: 25 s of load and faults
    "tests/bench/test_scale_bench.py",
    "tests/bench/test_latency_bench.py",
    "tests/server/api/test_schemathesis.py",
    "tests/server/training/test_demo.py",
    "tests/server/api/test_lm_eval.py",
    "tests/bench/test_serve_bench.py",
    "tests/server/test_generate.py",
    "tests/bench/test_routing_bench.py",
)


def unit_of(nodeid: str) -> str:
    """The work unit of a test: its file, or the unit its file shares."""
    path = nodeid.split("::", 1)[0]
    return ONE_UNIT.get(path, path)


def _rank(unit: str) -> int:
    return LONGEST.index(unit) if unit in LONGEST else len(LONGEST)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, with the shared units and in collection order (not by test count)."""
    if config.getvalue("dist") != "loadfile":
        return None  # any other --dist: xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False  # keep the order `pytest_collection_modifyitems` set
    return Scheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: the longest units first (every worker sorts alike; a stable sort, so
    each file's tests keep their order)."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: _rank(unit_of(item.nodeid)))
