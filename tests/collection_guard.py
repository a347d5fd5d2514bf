"""A run of the whole suite fails when a test file on disk contributes no collected test.

pytest skips some directories by default (`norecursedirs` holds `build`, `dist`, `venv`, ...),
and a rename, an `--ignore`, a config change or a module-level skip can hide a file just as
quietly: the run stays green while its tests never run. This hook compares the test files on disk
(by `python_files`, under the run's roots) with the files that collected items came from, before
`-k` or `-m` deselect anything, and stops the run with a usage error naming every file that
contributed none.

It applies only to a run of the whole suite (pytest with no path arguments: its `testpaths`, or
the invocation directory); a run of chosen files or directories is left alone. `tests/conftest.py`
imports it; `.ci/run` runs the whole suite.

Under pytest-xdist (`-n`) each worker collects the suite and checks it; a worker's usage error
would end only that worker, so the worker also leaves its message in its `workeroutput`, and the
controller raises it when the worker goes down (`pytest_testnodedown`): the same error and exit
status as a run without workers.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

WORKER_KEY = "collection_guard"  # where an xdist worker leaves its message for the controller


def _whole_suite_roots(config: pytest.Config) -> list[Path]:
    source = config.args_source
    if source is pytest.Config.ArgsSource.TESTPATHS:
        return [config.rootpath / p for p in config.getini("testpaths")]
    if source is pytest.Config.ArgsSource.INVOCATION_DIR:
        return [config.invocation_params.dir]
    return []


def test_files_on_disk(roots: list[Path], patterns: list[str]) -> set[Path]:
    return {
        path.resolve()
        for root in roots
        for path in root.rglob("*.py")
        if any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)
    }


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    roots = _whole_suite_roots(config)
    if not roots:
        return
    on_disk = test_files_on_disk(roots, config.getini("python_files"))
    collected = {item.path.resolve() for item in items}
    silent = sorted(on_disk - collected)
    if silent:
        names = "\n  ".join(str(path.relative_to(config.rootpath)) for path in silent)
        message = (
            f"{len(silent)} test file(s) on disk contributed no collected test (a skipped "
            f"directory, an --ignore, a module-level skip, or no test in them):\n  {names}"
        )
        workeroutput = getattr(config, "workeroutput", None)  # an xdist worker's
        if workeroutput is not None:
            workeroutput[WORKER_KEY] = message
        raise pytest.UsageError(message)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object | None) -> None:
    """On the xdist controller: a worker that found a silent file fails the run with its message."""
    message = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    if message:
        raise pytest.UsageError(message)
