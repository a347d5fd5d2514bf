"""The `hmem` CLI: profiles listing, and `tiers check` against real tiers."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main
from tests.conftest import S3Server


def test_profiles_lists_builtin_and_user_profiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = tmp_path / "mine.toml"
    extra.write_text('[lab-nas]\nlatency_ms = 2.5\nbandwidth_mb_s = 110\nsource = "our NAS"\n')
    assert main(["tiers", "profiles", "--profiles", str(extra)]) == 0
    out = capsys.readouterr().out
    assert "seed-external-disk" in out
    assert "lab-nas" in out
    assert "110 MB/s" in out


def test_check_reports_each_tier(
    tmp_path: Path, s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "hmem.toml"
    settings.write_text(
        f"""
[store.tiers.flash]
kind = "lmdb"
path = "{tmp_path / "flash"}"
[store.tiers.cloud]
kind = "s3"
bucket = "never-created"
endpoint_url = "{s3_server.endpoint_url}"
access_key_id = "testing"
secret_access_key = "testing-secret"
max_attempts = 1
[store.placement]
1 = "flash"
3 = "cloud"
"""
    )
    assert main(["tiers", "check", "--config", str(settings)]) == 1
    out = capsys.readouterr().out
    assert "flash        ok    0 blocks" in out
    assert "cloud        DOWN" in out
    assert "NoSuchBucket" in out
    assert "testing-secret" not in out


def test_bad_settings_are_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "hmem.toml"
    settings.write_text(
        '[store.tiers.d]\nkind = "disk"\nroot = "/tmp/x"\n[store.placement]\n1="d"\n'
    )
    monkeypatch.setenv("HMEM_STORE__DEADLINE_S", "-1")
    assert main(["tiers", "check", "--config", str(settings)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hmem: error: invalid settings: store.deadline_s: Input should be greater than 0"
    assert main(["tiers", "check", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_command_group_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("build", "synth", "eval", "demo", "bank", "tiers", "serve"):
        assert command in out


def test_build_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "cluster tree depth (default: 2)" in out
    assert "--anchor-size {" in out


def test_a_training_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["build", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hmem: error: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["serve", "--bank", "nope"], {}, "bank is missing its directory"),
        (["serve"], {"HMEM_API_KEYS": "{not json"}, "invalid settings"),
        (["serve"], {"HMEM_ADMIN_KEY": "short"}, "admin_key"),
        (["serve"], {"HMEM_MAX_BATCH": "0"}, "max_batch"),
        (["serve", "--config", "missing.toml"], {}, "does not exist"),
    ],
)
def test_serve_refuses_bad_settings_in_one_line_before_listening(
    argv: list[str],
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hmem: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_synth_build_eval_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    args = ["synth", "--out", str(corpus), "--invented-entities", "10", "--filler-docs", "20"]
    assert main([*args, "--max-mentions", "6"]) == 0
    assert main(
        ["build", "--corpus", str(corpus / "corpus.jsonl"), "--out", str(tmp_path / "bank"),
         "--levels", "2", "--branching", "3", "--widths", "8,4", "--anchor-size", "tiny",
         "--pretrain-steps", "5", "--steps", "5", "--embed-dim", "256", "--no-progress"]
    ) == 0  # fmt: skip
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert main(
        ["eval", "--bank", str(tmp_path / "bank"), "--facts", str(corpus / "facts.jsonl"),
         "--json", str(report), "--no-progress"]
    ) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "### element (118 facts)" in out
    assert "| bucket | mentions | memory | anchor | generic |" in out
    assert report.read_text().startswith("{")
