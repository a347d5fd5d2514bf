"""`hmem build` end to end on tiny settings, its refusals, and resumable training."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from server.bank import Bank
from server.bank.layout import ModelShape
from server.cli import main
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor, save_anchor
from server.model.memory import MemoryType
from server.model.memory_batch import build_memory_batch
from server.routing import Router
from server.tokenizer import AnchorTokenizer
from server.training.memory_params import MemoryParams
from server.training.pipeline import BuildSettings, build_bank
from server.training.tokenizer import byte_tokenizer
from server.training.train import Sequences, StageSettings, Trainer
from tests.server.model.conftest import anchor

TOPICS = [
    "iron is a metal used in steel and bridges",
    "the cat sat on the mat and purred softly",
    "rain fell over the quiet green valley",
    "the team won the final match at home",
    "bread needs flour water salt and yeast",
]


def corpus(path: Path, n: int = 90) -> Path:
    with path.open("w") as f:
        for i in range(n):
            text = f"{TOPICS[i % len(TOPICS)]}. Item {i} has code {i * 7 % 97}."
            f.write(json.dumps({"text": text}) + "\n")
    return path


def tiny(tmp_path: Path, **overrides: object) -> BuildSettings:
    fields: dict[str, object] = {
        "corpus": corpus(tmp_path / "corpus.jsonl"),
        "out": tmp_path / "bank",
        "levels": 2,
        "branching": 3,
        "widths": (8, 4),
        "anchor_size": "tiny",
        "pretrain_steps": 12,
        "memory_steps": 12,
        "batch_size": 8,
        "seq_len": 96,
        "embed_dim": 256,
        "progress": False,
    }
    fields.update(overrides)
    return BuildSettings(**fields)  # type: ignore[arg-type]


def test_a_tiny_build_writes_a_bank_the_model_code_serves(tmp_path: Path) -> None:
    summary = build_bank(tiny(tmp_path))
    assert summary.windows == 90
    assert summary.clusters == [3, 9]
    assert summary.memory_loss is not None
    bank = Bank.open(tmp_path / "bank")
    bank.verify()
    m = bank.manifest
    assert (m.levels, m.branching, m.widths, m.bank_id) == (2, 3, [8, 4], "bank")
    assert len(bank.block_keys()) == 3 + 9
    router = Router.load(
        bank.path / "router.safetensors", m.embedder, branching=m.branching, levels=m.levels
    )
    route = router.route_texts(["iron is a metal used in steel"])
    path = [bank.read_block(k) for k in (
        f"bank/L{lvl + 1}/{int(n)}" for lvl, n in enumerate(route.node_ids[0])
    )]  # fmt: skip
    model = load_anchor(bank.anchor_dir)
    tokens = torch.tensor([[1, 70, 85, 82, 81]])
    with torch.no_grad():
        out = model(tokens, memory=build_memory_batch([path], dtype=torch.float32))
    assert out.shape == (1, 5, model.config.vocab_size)
    assert not list(tmp_path.glob(".bank.*"))  # no partial or work directories left


def test_a_built_anchor_is_read_by_transformers_as_the_server_reads_it(tmp_path: Path) -> None:
    build_bank(tiny(tmp_path, pretrain_steps=0, memory_steps=0, seq_len=640))
    anchor_dir = tmp_path / "bank" / "anchor"
    assert sorted(p.name for p in anchor_dir.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    config = json.loads((anchor_dir / "config.json").read_text())
    ours = AnchorTokenizer.from_dir(anchor_dir, load_anchor(anchor_dir).config)
    hf = AutoTokenizer.from_pretrained(anchor_dir)
    for text in ["iron is a metal", "naïve café, 東京 🚀", "<s>x</s>", ""]:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert (
            hf.decode(ids, skip_special_tokens=True)
            == ours.decode(ids)
            == text.replace("<s>", "").replace("</s>", "")
        )
    assert (hf.bos_token_id, hf.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    assert (hf.bos_token, hf.eos_token) == (ours.bos_token, ours.eos_token) == ("<s>", "</s>")
    assert hf.model_max_length == config["max_position_embeddings"] == 640
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Iron?"}]
    text = ours.render_chat(chat)
    assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>\n")
    assert text.endswith("<|assistant|>\n")
    ids = ours.encode(text, add_bos=False)
    assert ids == hf.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids.count(config["bos_token_id"]) == 1
    assert ids[0] == config["bos_token_id"]


def test_an_existing_checkpoints_tokenizer_config_and_template_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "anchor"
    save_anchor(Anchor(replace(anchor().config, vocab_size=byte_tokenizer().get_vocab_size())), src)
    byte_tokenizer().save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "x": 1}))
    (src / "chat_template.jinja").write_text("{{ bos_token }}[{{ messages[0]['content'] }}]")
    build_bank(tiny(tmp_path, anchor_dir=src, freeze_anchor=True, memory_steps=0))
    out = tmp_path / "bank" / "anchor"
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    tok = AnchorTokenizer.from_dir(out, load_anchor(out).config)
    assert tok.config == {"bos_token": "<s>", "x": 1}
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<s>[hi]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corpus", "{tmp}/missing.jsonl"], "does not exist"),
        (["--corpus", "{tmp}/empty.jsonl"], "holds no documents"),
        (["--corpus", "{tmp}/bad.jsonl"], "bad.jsonl:2: not JSON"),
        (
            ["--corpus", "{tmp}/c.jsonl", "--levels", "3", "--branching", "8"],
            "90 documents for 512 clusters",
        ),
        (["--corpus", "{tmp}/c.jsonl", "--widths", "8,4,2"], "--widths has 3 values for 2 levels"),
        (["--corpus", "{tmp}/c.jsonl", "--anchor", "{tmp}/falcon"], "unsupported model_type"),
        (["--corpus", "{tmp}/c.jsonl", "--device", "cuda"], "no CUDA device"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has CUDA")
    corpus(tmp_path / "c.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (tmp_path / "falcon").mkdir()
    (tmp_path / "falcon" / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    argv = ["build", "--out", str(tmp_path / "out"), "--no-progress"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hmem: error: ")
    assert message in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_an_existing_bank_is_kept_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_bank(tiny(tmp_path))
    before = (tmp_path / "bank" / "manifest.json").read_text()
    with pytest.raises(ValueError, match="already holds a bank; pass --overwrite"):
        build_bank(tiny(tmp_path, seed=1))
    assert (tmp_path / "bank" / "manifest.json").read_text() == before
    build_bank(tiny(tmp_path, seed=1, overwrite=True))
    assert (tmp_path / "bank" / "manifest.json").read_text() != before


def test_frozen_anchor_mode_adds_memory_to_an_existing_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "anchor"
    model = anchor()  # vocab 97 < the byte tokenizer's 259: use a matching vocabulary
    cfg = replace(model.config, vocab_size=byte_tokenizer().get_vocab_size())
    base = Anchor(cfg)
    save_anchor(base, src)
    byte_tokenizer().save(str(src / "tokenizer.json"))
    build_bank(tiny(tmp_path, anchor_dir=src, freeze_anchor=True))
    out = load_anchor(tmp_path / "bank" / "anchor")
    for (name, p), q in zip(base.state_dict().items(), out.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    trained = Bank.open(tmp_path / "bank").read_block("bank/L1/0")
    assert any(t.abs().sum() > 0 for name, t in trained.tensors().items() if name == "down")


def test_an_interrupted_stage_resumes_to_the_same_result(tmp_path: Path) -> None:
    tokens = [[1, *range(3, 40), 2], [1, *range(50, 90), 2], [1, *range(60, 80), 2]] * 4
    paths = torch.tensor([[i % 2, i % 4] for i in range(len(tokens))])
    data = Sequences.build(tokens, paths, 64)
    shape_kw = {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8}

    def run(work: Path, until: int | None) -> Trainer:
        model = anchor()
        memory = MemoryParams(
            memory_type=MemoryType.FFN,
            model=ModelShape(intermediate_size=64, **shape_kw),
            branching=2,
            widths=(4, 2),
            lora_targets=None,
            seed=0,
        )
        t = Trainer("memories", model=model, memory=memory, data=data, work_dir=work,
                    settings=StageSettings(steps=20, batch_size=4), seed=5, generic_prob=0.3,
                    checkpoint_every=100)  # fmt: skip
        t.resume()
        t.run(progress=False, until=until)
        return t

    straight = run(tmp_path / "a", None)
    first = run(tmp_path / "b", 8)
    assert first.step == 8
    resumed = run(tmp_path / "b", None)
    assert resumed.step == 20
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for p, q in zip(straight.memory.parameters(), resumed.memory.parameters(), strict=True):  # type: ignore[union-attr]
        torch.testing.assert_close(p, q)


# `hmem build` in a child process that stops for good once its bank writer has begun writing
# into the partial directory (the second file it opens there), so that a test can kill it at
# exactly that point. The audit hook only pauses the real process; it changes nothing it does.
PAUSED_IN_EXPORT = """
import signal, sys, time
from pathlib import Path
# A shell starting the suite in the background (`cmd &` without job control) makes its children
# ignore SIGINT; Ctrl-C at a terminal reaches a build that has Python's handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
marker, argv = Path(sys.argv[1]), sys.argv[2:]
written = []
def pause_in_export(event, args):
    if event == "open" and ".partial-" in str(args[0]) and "w" in str(args[1]):
        written.append(args[0])
        if len(written) == 2:
            marker.write_text(str(args[0]))
            time.sleep(600)
sys.addaudithook(pause_in_export)
from server.cli import main
sys.exit(main(argv))
"""


def tiny_argv(tmp_path: Path) -> list[str]:
    """`hmem build` flags for the settings of `tiny`."""
    s = tiny(tmp_path)
    return [
        "build", "--corpus", str(s.corpus), "--out", str(s.out), "--levels", str(s.levels),
        "--branching", str(s.branching), "--widths", ",".join(map(str, s.widths)),
        "--anchor-size", s.anchor_size, "--pretrain-steps", str(s.pretrain_steps),
        "--steps", str(s.memory_steps), "--batch-size", str(s.batch_size),
        "--seq-len", str(s.seq_len), "--embed-dim", str(s.embed_dim), "--no-progress",
    ]  # fmt: skip


def build_paused_in_export(tmp_path: Path, argv: list[str]) -> tuple[subprocess.Popen[str], Path]:
    """A real `hmem build` child, paused with its partial directory half-written."""
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_IN_EXPORT, str(marker), *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the build never reached its export: {proc.communicate()[1]}")
        time.sleep(0.05)
    partials = list(tmp_path.glob(".bank.partial-*"))
    assert len(partials) == 1
    assert any(partials[0].rglob("*.safetensors")), "nothing written yet"
    return proc, partials[0]


def finish(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the same build again, in this process, to the end: its summary."""
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    Bank.open(tmp_path / "bank").verify()
    assert not list(tmp_path.glob(".bank.*"))  # no partial or work directory left
    return capsys.readouterr().out


@pytest.mark.slow
def test_a_build_killed_outright_leaves_a_partial_the_next_build_removes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = tiny_argv(tmp_path)
    proc, partial = build_paused_in_export(tmp_path, argv)
    try:
        # While it lives, the build owns its output: a second one is refused and touches nothing.
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == (
            f"hmem: error: another hmem build (pid {proc.pid}) is writing {tmp_path / 'bank'}: "
            "wait for it to finish, or stop it and run this build again (it resumes)\n"
        )
        assert partial.is_dir()
    finally:
        proc.kill()  # SIGKILL: no handler runs, the partial directory stays
        proc.communicate()
    assert partial.is_dir()
    assert not (tmp_path / "bank").exists()

    out = finish(tmp_path, argv, capsys)
    assert "resumed     pretrain at step 12, memories at step 12 from checkpoints" in out
    assert not partial.exists()


@pytest.mark.slow
def test_ctrl_c_stops_a_build_in_one_line_and_it_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = tiny_argv(tmp_path)
    proc, partial = build_paused_in_export(tmp_path, argv)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()  # whatever happened: no pipe left for the next test to find
    assert proc.returncode == 130
    assert (
        err == "hmem: interrupted; run the same command again to resume from the last checkpoint\n"
    )
    assert not partial.exists()  # the writer removes what it wrote
    assert (tmp_path / ".bank.build-work").is_dir()  # the checkpoints stay

    assert "resumed     pretrain at step 12" in finish(tmp_path, argv, capsys)
