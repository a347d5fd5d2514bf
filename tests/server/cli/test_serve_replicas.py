"""`hmem serve --replicas N`: its flags, and the errors that come before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main


@pytest.mark.parametrize(
    "flags",
    [
        ["--ray-address", "auto"],
        ["--replica-cpus", "1"],
        ["--max-replicas-per-node", "1"],
        ["--routing", "ray"],
        ["--spill", "2"],
    ],
)
def test_cluster_flags_need_replicas(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hmem: error: --")
    assert "needs --replicas N" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--replicas", "2", "--replica-cpus", "-1"], "--replica-cpus must be at least 0"),
        (["--replicas", "2", "--max-replicas-per-node", "0"], "--max-replicas-per-node must be"),
        (["--replicas", "2", "--spill", "0"], "--spill must be at least 1"),
        (["--replicas", "2", "--routing", "ray", "--spill", "2"], "--spill applies to --routing"),
    ],
)
def test_bad_cluster_options_fail_in_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_a_bad_bank_fails_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--replicas", "2", "--bank", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "manifest" in err
    assert err.count("\n") == 1


def test_help_shows_the_cluster_flags_and_their_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    flags = ("--replicas N", "--ray-address ADDR", "--replica-cpus F", "--routing", "--spill K")
    for flag in flags:
        assert flag in text
    assert "to the replica holding the path (default)" in text
    assert "default: start a Ray on this machine" in text
    assert "so a hot subtree spreads (default: 4)" in text
