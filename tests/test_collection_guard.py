"""The suite's guard: a whole run fails when a test file is silently left out of collection.

Each case lays out a small project in a temporary directory whose conftest uses the guard, and
runs a real pytest in a subprocess on it, as `.ci/run` runs the real suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
A_TEST = "def test_one():\n    assert [1] * 2 == [1, 1]\n"


def project(root: Path, files: dict[str, str]) -> Path:
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["suite"]\n')
    conftest = (
        "from tests.collection_guard import pytest_collection_modifyitems, pytest_testnodedown"
        "  # noqa: F401\n"
    )
    (root / "suite").mkdir()
    (root / "suite" / "conftest.py").write_text(conftest)
    for name, text in files.items():
        path = root / "suite" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run_pytest(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_directory_pytest_skips_by_default_fails_the_run(tmp_path: Path) -> None:
    # `build` is in pytest's default norecursedirs: without the guard this run is green.
    root = project(tmp_path, {"test_a.py": A_TEST, "build/test_b.py": A_TEST})
    result = run_pytest(root)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "suite/build/test_b.py" in result.stderr
    assert "1 test file(s) on disk contributed no collected test" in result.stderr


def test_the_same_files_under_a_collected_name_pass(tmp_path: Path) -> None:
    root = project(tmp_path, {"test_a.py": A_TEST, "training/test_b.py": A_TEST})
    result = run_pytest(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


@pytest.mark.parametrize(
    "silent",
    [
        pytest.param("import pytest\npytestmark = pytest.mark.skip\n" + A_TEST, id="kept-skip"),
        pytest.param("import pytest\npytest.skip('no', allow_module_level=True)\n", id="module"),
        pytest.param("def helper():\n    return 1\n", id="no-test"),
    ],
)
def test_a_file_that_contributes_nothing_fails_the_run(tmp_path: Path, silent: str) -> None:
    root = project(tmp_path, {"test_a.py": A_TEST, "test_silent.py": silent})
    result = run_pytest(root)
    if "pytestmark" in silent:
        # A marked skip still collects the test (reported as skipped): nothing is hidden.
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 passed, 1 skipped" in result.stdout
    else:
        assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
        assert "suite/test_silent.py" in result.stderr


def test_an_ignore_option_cannot_hide_a_file(tmp_path: Path) -> None:
    root = project(tmp_path, {"test_a.py": A_TEST, "test_b.py": A_TEST})
    result = run_pytest(root, "--ignore", "suite/test_b.py")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "suite/test_b.py" in result.stderr


def test_a_run_of_chosen_files_is_left_alone(tmp_path: Path) -> None:
    root = project(tmp_path, {"test_a.py": A_TEST, "build/test_b.py": A_TEST})
    result = run_pytest(root, "suite/test_a.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_keyword_deselection_is_not_a_silent_file(tmp_path: Path) -> None:
    root = project(tmp_path, {"test_a.py": A_TEST, "test_b.py": A_TEST.replace("one", "two")})
    result = run_pytest(root, "-k", "one")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 deselected" in result.stdout


def test_under_xdist_workers_a_silent_file_fails_the_run_with_its_name(tmp_path: Path) -> None:
    # Each worker finds it; the controller reports it as the run without workers does.
    root = project(tmp_path, {"test_a.py": A_TEST, "build/test_b.py": A_TEST})
    result = run_pytest(root, "-n", "2")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "suite/build/test_b.py" in result.stderr
    assert "1 test file(s) on disk contributed no collected test" in result.stderr


def test_under_xdist_workers_a_whole_suite_passes(tmp_path: Path) -> None:
    root = project(tmp_path, {"test_a.py": A_TEST, "training/test_b.py": A_TEST})
    result = run_pytest(root, "-n", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
