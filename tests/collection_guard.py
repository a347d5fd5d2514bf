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
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest


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
        raise pytest.UsageError(
            f"{len(silent)} test file(s) on disk contributed no collected test (a skipped "
            f"directory, an --ignore, a module-level skip, or no test in them):\n  {names}"
        )
