"""The `hmem` CLI: profiles listing, `tiers check` against real tiers, and how every command
fails: bad input in one line with exit status 2, Ctrl-C in one line with 130, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.api.server import hold_data_dir
from server.cli import main
from server.defaults import DEMO_BANK
from tests.conftest import S3Server

FACT = {"entity": "Iron", "family": "element", "query": "The atomic number of Iron is",
        "answer": " 26", "mentions": 3, "bucket": 0}  # fmt: skip


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
        (["serve", "--bank", "nope", "--port", "0"], {}, "bank is missing its directory"),
        (["serve"], {"HMEM_API_KEYS": "{not json"}, "invalid settings"),
        (["serve"], {"HMEM_ADMIN_KEY": "short"}, "admin_key"),
        (["serve"], {"HMEM_MAX_BATCH": "0"}, "max_batch"),
        (["serve", "--config", "missing.toml"], {}, "does not exist"),
        # A typo disables nothing silently: the name is refused, the nearest valid one named.
        (
            ["serve"],
            {"HMEM_API_KEY": '["k-0123456789abcdef"]'},
            "variable HMEM_API_KEY: not a setting (did you mean HMEM_API_KEYS?)",
        ),
        (
            ["serve"],
            {"HMEM_STORE__DEADLINE": "0.5"},
            "HMEM_STORE__DEADLINE: not a setting (did you mean HMEM_STORE__DEADLINE_S?)",
        ),
        (["serve"], {"hmem_max_btach": "4"}, "(did you mean HMEM_MAX_BATCH?)"),
        (
            ["serve", "--config", "typo.toml"],
            {},
            "api_key: not a setting (did you mean api_keys?)",
        ),
        (
            ["serve", "--config", "typo-nested.toml"],
            {},
            "store.deadline: not a setting (did you mean deadline_s?)",
        ),
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
    (tmp_path / "typo.toml").write_text('api_key = ["k-0123456789abcdef"]\n')
    (tmp_path / "typo-nested.toml").write_text(
        '[store]\ndeadline = 0.5\n[store.tiers.d]\nkind = "disk"\nroot = "d"\n'
        '[store.placement]\n1 = "d"\n'
    )
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


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command wrote to stderr, without its `hmem: error: ` prefix."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("hmem: error: "), err
    return err.removeprefix("hmem: error: ").strip()


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Files in the wrong shape, in the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    (tmp_path / "facts.csv").write_text("entity,family,query,answer\nIron,element,q,26\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "array.json").write_text(json.dumps([FACT], indent=2))
    (tmp_path / "facts.jsonl").write_text(json.dumps(FACT) + "\n")
    (tmp_path / "typed.jsonl").write_text(json.dumps(FACT | {"mentions": "3"}) + "\n")
    (tmp_path / "binary.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "bad.toml").write_text("[store\n")
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "nostore.toml").write_text("max_batch = 4\n")
    return tmp_path


FACTS_SHAPE = "entity (str), family (str), query (str), answer (str), mentions (int), bucket (int)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # eval: facts in another format name the file, the line and the fields a fact needs.
        (["eval", "--bank", "dir", "--facts", "qa.jsonl"],
         f"qa.jsonl:1: a fact needs the fields {FACTS_SHAPE}; missing or of another type here: "
         "entity, family, query, mentions, bucket (the line has question, answer)"),
        (["eval", "--bank", "dir", "--facts", "facts.csv"],
         f"facts.csv:1 is not valid JSON (Expecting value); expected one JSON object per line "
         f"with {FACTS_SHAPE}, as `hmem synth` writes facts.jsonl"),
        (["eval", "--bank", "dir", "--facts", "empty.jsonl"], "empty.jsonl holds no facts"),
        (["eval", "--bank", "dir", "--facts", "array.json"], "array.json:1 opens a JSON array"),
        (["eval", "--bank", "dir", "--facts", "typed.jsonl"], "typed.jsonl:1: a fact needs"),
        (["eval", "--bank", "dir", "--facts", "dir"], "facts file dir is a directory"),
        (["eval", "--bank", "dir", "--facts", "nope.jsonl"], "facts file nope.jsonl does not"),
        (["eval", "--bank", "dir", "--facts", str(DEMO_BANK / "manifest.json")], "manifest.json:1"),
        (["eval", "--bank", "missing", "--facts", "facts.jsonl"], "bank is missing its directory"),
        (["eval", "--bank", str(DEMO_BANK), "--facts", "qa.jsonl", "--json", "dir"], "--json dir"),
        (["eval", "--bank", str(DEMO_BANK), "--facts", "qa.jsonl", "--json", "nope/r.json"],
         "--json nope/r.json"),
        # build: the corpus, the output and the bank id, before anything is trained.
        (["build", "--corpus", "binary.jsonl", "--out", "b"], "can't decode"),
        (["build", "--corpus", "dir", "--out", "b"], "corpus directory dir holds no"),
        (["build", "--corpus", "qa.jsonl", "--out", "file/b"], "--out file/b: "),
        (["build", "--corpus", "qa.jsonl", "--out", "b", "--bank-id", "../x"], "bank id '../x'"),
        (["build", "--corpus", "qa.jsonl", "--out", "my bank"], "bank id 'my bank' from the --out"),
        # synth and demo: an output that is a file.
        (["synth", "--out", "file"], "--out file exists and is not a directory"),
        (["synth", "--out", "s", "--invented-entities", "2"], "invented_entities >= 5"),
        (["demo", "--data-dir", "file", "--no-progress"], "file/demo-corpus: Not a directory"),
        # bank push and verify: a bank that is missing, not a bank, or a file.
        (["bank", "push", "missing", "--tier", "1=dir"], "bank is missing its directory"),
        (["bank", "push", "dir", "--tier", "1=dir"], "bank is missing its manifest"),
        (["bank", "verify", "file", "--tier", "1=dir"], "bank is missing its directory"),
        (["bank", "push", str(DEMO_BANK), "--tier", "oops"], "expected LEVEL=URI"),
        # serve and tiers: settings files that are missing, a directory, or do not parse.
        (["serve", "--config", "bad.json"], "settings file bad.json is not valid JSON"),
        (["serve", "--config", "bad.toml"], "settings file bad.toml is not valid TOML"),
        (["serve", "--config", "dir"], "settings file dir"),
        (["serve", "--chat-template", "dir"], "chat_template"),
        (["tiers", "check", "--config", "bad.toml"], "settings file bad.toml is not valid TOML"),
        (["tiers", "check", "--config", "nostore.toml"], "no store configured"),
        (["tiers", "profiles", "--profiles", "missing.toml"], "cannot read profiles file"),
        (["tiers", "profiles", "--profiles", "bad.json"], "is not valid"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(
    inputs: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_one_line(inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (inputs / "facts.jsonl").chmod(0)
    assert main(["eval", "--bank", "dir", "--facts", "facts.jsonl"]) == 2
    assert one_error_line(capsys) == "facts.jsonl: Permission denied"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--steps", "-1"], "argument --steps: must be >= 0, got -1"),
        (["--seq-len", "x"], "argument --seq-len: expected an integer, got 'x'"),
        (["--embed-dim", "0"], "argument --embed-dim: must be >= 1, got 0"),
        (["--lr", "-1"], "argument --lr: must be a number > 0, got '-1'"),
        (["--lr", "nan"], "argument --lr: must be a number > 0, got 'nan'"),
        (["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    ],
)
def test_bad_build_flags_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["build", "--corpus", "c.jsonl", "--out", "b", *argv])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"hmem build: error: {message}"


def test_serve_on_a_taken_port_fails_at_once_without_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.perf_counter()
        assert main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]) == 2
        seconds = time.perf_counter() - started
    assert one_error_line(capsys) == (
        f"127.0.0.1:{port} is in use (another server?): stop it, or serve on another port with "
        "--port or HMEM_PORT"
    )
    assert seconds < 2
    # Nothing was opened: the default tiers and the blocklist live under the data directory.
    assert not (tmp_path / "data").exists()


def hmem(*argv: str, stderr: Path) -> subprocess.Popen[bytes]:
    """The real CLI in a child process (`python -m server.cli`), its stderr into a file."""
    with stderr.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "server.cli", *argv], stdout=subprocess.DEVNULL, stderr=err
        )


@pytest.mark.slow
def test_ctrl_c_stops_serve_in_one_line_with_status_130(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    proc = hmem("serve", "--port", "0", "--data-dir", str(tmp_path / "data"), stderr=log)
    try:
        deadline = time.monotonic() + 120
        while "serving bank" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        line = next(x for x in log.read_text().splitlines() if "serving bank" in x)
        url = line.split(" on ")[1].split()[0]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    err = log.read_text()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "hmem: interrupted"


def test_a_second_server_on_one_data_directory_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two servers on one data directory would share its blocklists unknowingly: the second
    stops before it listens, naming the first's pid; once the first is gone, it starts."""
    state = tmp_path / "state"
    with hold_data_dir(state):  # the first server, as `hmem serve` holds it
        assert main(["serve", "--data-dir", str(state), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"hmem: error: another hmem serve (pid {os.getpid()}) is using data directory "
            f"{state}: stop it, or give this one its own with --data-dir or HMEM_DATA_DIR\n"
        )
    with hold_data_dir(state):  # released when the first ends, however it ends
        pass


def test_verify_right_after_a_build_says_the_bank_verifies_and_is_not_pushed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hmem bank verify BANK` with no tiers, before any push: the bank directory itself is
    checked and the missing copies are named as not pushed (it was "verify FAILED")."""
    bank = tmp_path / "bank"
    shutil.copytree(DEMO_BANK, bank)
    assert main(["bank", "verify", str(bank), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bank 'demo': the bank directory verifies (72 blocks, every digest matches)" in out
    assert f"no copies are pushed to the default tiers ({os.environ['HMEM_DATA_DIR']}" in out
    assert f"`hmem bank push {bank}` writes them" in out
    # Once pushed, the copies themselves are verified, as before.
    assert main(["bank", "push", str(bank), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["bank", "verify", str(bank), "--no-progress"]) == 0
    assert "bank 'demo': verify ok" in capsys.readouterr().out
    # A bank directory that does not verify, with nothing pushed anywhere, says so and fails.
    other = tmp_path / "other"
    shutil.copytree(DEMO_BANK, other)
    block = next((other / "blocks" / "L1").iterdir())
    block.write_bytes(b"x" + block.read_bytes()[1:])
    monkeypatch.setenv("HMEM_DATA_DIR", str(tmp_path / "fresh"))
    assert main(["bank", "verify", str(other), "--no-progress"]) == 1
    assert "the bank directory does not verify" in capsys.readouterr().out
