"""`hmem pretrain` at its tiny size on the standard library's docstrings (present wherever Python
is): the checkpoint it writes, resuming a killed run, memories added to it by `hmem build`, and
the open-text sources it reads."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from server.bank import Bank
from server.cli import main
from server.model.checkpoint import load_anchor
from server.tokenizer import AnchorTokenizer
from server.training.opentext import SOURCES, gather, resolve_sources, text_dir_source
from server.training.pipeline import BuildSettings, build_bank
from server.training.pretrain import RECORD, PretrainSettings, pretrain
from server.training.pretrain_data import train_tokenizer
from tests.server.training.test_build import corpus

STDLIB_CHARS = 200_000


def tiny(out: Path, **overrides: object) -> PretrainSettings:
    fields: dict[str, object] = {
        "out": out, "size": "tiny", "sources": ("python-stdlib",),
        "max_chars_per_source": STDLIB_CHARS, "steps": 30, "eval_every": 10,
        "checkpoint_every": 10, "device": "cpu", "progress": False,
    }  # fmt: skip
    fields.update(overrides)
    return PretrainSettings(**fields)  # type: ignore[arg-type]


def tiny_argv(out: Path) -> list[str]:
    """`hmem pretrain` flags for the settings of `tiny`."""
    return [
        "pretrain", "--out", str(out), "--size", "tiny", "--sources", "python-stdlib",
        "--max-mb-per-source", str(STDLIB_CHARS / 1e6), "--steps", "30", "--eval-every", "10",
        "--checkpoint-every", "10", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def anchor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "anchor"
    pretrain(tiny(out))
    return out


def test_the_checkpoint_is_read_by_the_server_and_by_transformers_alike(anchor_dir: Path) -> None:
    assert sorted(p.name for p in anchor_dir.iterdir()) == [
        "config.json", "model.safetensors", RECORD, "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert not list(anchor_dir.parent.glob(".anchor.*"))  # no work or partial directory left
    model = load_anchor(anchor_dir)
    ours = AnchorTokenizer.from_dir(anchor_dir, model.config)
    hf = AutoTokenizer.from_pretrained(anchor_dir)
    assert (ours.bos_id, ours.eos_ids) == (1, frozenset({2}))
    assert ours.vocab_size == model.config.vocab_size == 512  # the BPE filled its vocabulary
    for text in ["Return the absolute value of the argument.", "naïve café, 東京 🚀", ""]:
        ids = ours.encode(text)
        assert ids[0] == 1
        assert hf(text)["input_ids"] == ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    words = ours.encode("Return the value of the object", add_bos=False)
    assert len(words) < len("Return the value of the object") / 2  # merges, not bytes
    chat = [{"role": "user", "content": "What does len return?"}]
    text = ours.render_chat(chat)
    assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|user|>\n")
    with torch.no_grad():
        logits = model(torch.tensor([ours.encode("Return the")]))
    assert logits.shape == (1, len(ours.encode("Return the")), 512)


def test_the_record_names_the_sources_licences_and_a_falling_loss(anchor_dir: Path) -> None:
    record = json.loads((anchor_dir / RECORD).read_text())
    (source,) = record["sources"]
    assert (source["name"], source["licence"], source["chars"]) == (
        "python-stdlib", "PSF-2.0", STDLIB_CHARS,
    )  # fmt: skip
    assert record["settings"]["size"] == "tiny"
    assert record["settings"]["steps"] == 30
    curve = record["curve"]
    assert [p["step"] for p in curve] == [10, 20, 30]
    # Trained: well below a uniform guess over the vocabulary, and still falling.
    assert curve[-1]["val_loss"] < math.log(512) - 1
    assert curve[-1]["val_loss"] < curve[0]["val_loss"]
    assert 0 < curve[-1]["val_bits_per_byte"] < 8


def test_hmem_build_adds_memories_to_the_pretrained_anchor(
    anchor_dir: Path, tmp_path: Path
) -> None:
    summary = build_bank(
        BuildSettings(
            corpus=corpus(tmp_path / "corpus.jsonl"),
            out=tmp_path / "bank",
            anchor_dir=anchor_dir,
            levels=1,
            branching=3,
            widths=(8,),
            memory_steps=6,
            batch_size=4,
            seq_len=64,
            embed_dim=256,
            progress=False,
        )
    )
    assert summary.memory_loss is not None
    bank = Bank.open(tmp_path / "bank")
    bank.verify()
    assert summary.anchor_params == sum(p.numel() for p in load_anchor(anchor_dir).parameters())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (bank.anchor_dir / name).read_bytes() == (anchor_dir / name).read_bytes()
    frozen, built = (
        load_file(str(anchor_dir / "model.safetensors")),
        load_file(str(bank.anchor_dir / "model.safetensors")),
    )
    assert all(torch.equal(frozen[k], built[k]) for k in frozen)  # memories only: anchor frozen


# `hmem pretrain` in a child process that stops for good as it is about to record the loss at
# its second evaluation (step 20, its checkpoint there already written), so that the test can
# kill it at that point. The audit hook only pauses the real process; it changes nothing it does.
PAUSED_AT_SECOND_EVAL = """
import sys, time
from pathlib import Path
marker, argv = Path(sys.argv[1]), sys.argv[2:]
opened = []
def pause(event, args):
    if event == "open" and str(args[0]).endswith("curve.tmp") and "w" in str(args[1]):
        opened.append(args[0])
        if len(opened) == 2:
            marker.write_text("paused")
            time.sleep(600)
sys.addaudithook(pause)
from server.cli import main
sys.exit(main(argv))
"""


@pytest.mark.slow
def test_a_killed_pretrain_resumes_to_the_weights_of_an_unbroken_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker, out = tmp_path / "paused", tmp_path / "killed" / "anchor"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_AT_SECOND_EVAL, str(marker), *tiny_argv(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no handler runs, nothing of the run's own is cleaned up
        stdout, stderr = proc.communicate()
    assert marker.exists(), f"the pretrain never reached its second evaluation: {stderr}"
    assert "estimate " in stdout  # told before it started
    assert "step      10  loss" in stdout
    assert not out.exists()

    assert main(tiny_argv(out)) == 0
    resumed = capsys.readouterr().out
    assert "resuming at step 20" in resumed
    assert "resumed     at step 20 from its checkpoint" in resumed
    unbroken = tmp_path / "unbroken" / "anchor"
    pretrain(tiny(unbroken))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(unbroken / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    curve_a = json.loads((out / RECORD).read_text())["curve"]
    curve_b = json.loads((unbroken / RECORD).read_text())["curve"]
    assert curve_a == curve_b  # the loss at step 20 was measured on resuming


def test_bad_settings_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "anchor"
    argv = tiny_argv(out)
    assert main([*argv[:6], "python-stdlib,plays", *argv[7:]]) == 2
    assert capsys.readouterr().err == (
        "hmem: error: unknown text source(s) plays: choose from auto, python-stdlib, "
        "python-docs, kjv, wordnet\n"
    )
    assert main([*argv, "--text", str(tmp_path / "nowhere")]) == 2
    assert f"--text {tmp_path / 'nowhere'} is not a directory" in capsys.readouterr().err
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(argv) == 2
    assert "is not empty; pass --overwrite to replace it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anchor"]


def test_a_text_directory_is_a_source_read_in_order_and_capped(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "second.md").write_text("Second, in markdown.")
    (tmp_path / "a.txt").write_text("First, as plain text.")
    (tmp_path / "notes.rst").write_text("Not read: neither .txt nor .md.")
    text = gather([text_dir_source(tmp_path)], required=True)
    assert text.documents() == ["First, as plain text.", "Second, in markdown."]
    capped = gather([text_dir_source(tmp_path)], required=True, max_chars_per_source=25)
    assert capped.documents() == ["First, as plain text.", "Seco"]
    assert capped.chars == 25


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_installed_source_reads_as_english_prose(name: str) -> None:
    source = SOURCES[name]
    if source.locate() is None:
        pytest.skip(f"{name} is not installed here ({source.install})")
    text = gather(resolve_sources([name]), required=True, max_chars_per_source=100_000)
    docs = text.documents()
    assert text.chars == 100_000
    joined = " ".join(docs)
    words = joined.lower().split()
    assert sum(w in ("the", "of", "and", "a", "to", "in") for w in words) > len(words) / 25
    # No markup or record syntax left: reStructuredText roles, WordNet offsets, verse numbers.
    assert ":func:`" not in joined
    assert ".. note::" not in joined
    assert re.search(r"\b\d{8} \d\d [nvasr] ", joined) is None
    assert re.search(r"\b[1-3]?[A-Z][a-z]{1,3}\d+:\d+ ", joined) is None


def test_the_tokenizer_round_trips_any_text_and_keeps_hmems_special_ids() -> None:
    tok = train_tokenizer(["the cat sat on the mat. " * 50, "a dog ran in the fog. " * 50],
                          vocab_size=300, progress=False)  # fmt: skip
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    for text in ["the cat", "Ünïcödé ☃ never seen \t\n", "</s>"]:
        ids = tok.encode(text).ids
        assert ids[0] == 1
        assert tok.decode(ids, skip_special_tokens=False).removeprefix("<s>") == text
