"""The anchor tokenizer: a real tokenizer.json trained here, refusals, and the demo anchor's
Hugging Face layout read by `transformers` itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from server.defaults import DEMO_BANK
from server.model.config import PRESETS, AnchorConfig
from server.model.errors import CheckpointError
from server.model.families import read_config
from server.tokenizer import AnchorTokenizer, ChatTemplateError
from server.training.tokenizer import CHAT_TEMPLATE, write_byte_tokenizer

TEXT = ["The atomic number of iron is 26.", "Einsteinium has atomic number 99."] * 20


def trained(tmp_path: Path, vocab: int = 90) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_round_trip_with_bos_and_eos(tmp_path: Path) -> None:
    config = dataclasses.replace(PRESETS["test"], vocab_size=512, bos_token_id=1, eos_token_id=[2])
    tok = AnchorTokenizer.from_dir(trained(tmp_path, vocab=300), config)
    ids = tok.encode("The atomic number of iron is 26.")
    assert ids[0] == 1
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == "The atomic number of iron is 26."
    assert tok.eos_ids == frozenset({2})


def test_a_vocabulary_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    config = dataclasses.replace(PRESETS["test"], vocab_size=50)
    with pytest.raises(CheckpointError, match="vocab_size is 50"):
        AnchorTokenizer.from_dir(trained(tmp_path, vocab=300), config)


def test_missing_or_broken_tokenizer_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        AnchorTokenizer.from_dir(tmp_path, PRESETS["test"])
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer"):
        AnchorTokenizer.from_dir(tmp_path, PRESETS["test"])


# -- the Hugging Face layout: transformers reads the same ids, tokens and template ------------

DEMO_ANCHOR = DEMO_BANK / "anchor"
TEXTS = [
    "The atomic number of Thulium is",
    "héllo, 日本語です 😀👍🏽",
    "<s>a literal BOS, then an EOS</s> and <pad>",
    " leading and trailing spaces ",
    "",
]


def demo_config() -> AnchorConfig:
    return read_config(json.loads((DEMO_ANCHOR / "config.json").read_text()))


def test_transformers_encodes_and_decodes_the_demo_anchor_as_the_server_does() -> None:
    ours = AnchorTokenizer.from_dir(DEMO_ANCHOR, demo_config())
    hf = AutoTokenizer.from_pretrained(DEMO_ANCHOR)
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert ids[0] == ours.bos_id == 1
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert ours.decode(ours.encode(TEXTS[1])) == TEXTS[1]
    # The packaged model was trained on these ids: the byte vocabulary must never move.
    assert ours.encode("hello") == [1, 74, 71, 78, 78, 81]


def test_the_special_tokens_match_config_json() -> None:
    cfg = json.loads((DEMO_ANCHOR / "config.json").read_text())
    ours = AnchorTokenizer.from_dir(DEMO_ANCHOR, demo_config())
    hf = AutoTokenizer.from_pretrained(DEMO_ANCHOR)
    assert (hf.bos_token, hf.bos_token_id) == (ours.bos_token, cfg["bos_token_id"]) == ("<s>", 1)
    assert (hf.eos_token, hf.eos_token_id) == (ours.eos_token, cfg["eos_token_id"]) == ("</s>", 2)
    assert ours.eos_ids == frozenset({2})
    assert hf.pad_token_id == 0
    assert hf.model_max_length == cfg["max_position_embeddings"]
    assert ours.config["bos_token"] == "<s>"
    assert ours.chat_template == ours.config["chat_template"] == CHAT_TEMPLATE


def test_special_token_text_is_its_id_and_add_bos_false_adds_none() -> None:
    ours = AnchorTokenizer.from_dir(DEMO_ANCHOR, demo_config())
    plain = ours.encode("x", add_bos=False)
    assert ours.encode("<s>x", add_bos=False) == [1, *plain]
    assert ours.encode("<s>x") == [1, 1, *plain]
    assert ours.encode("x</s>", add_bos=False) == [*plain, 2]
    assert ours.encode("", add_bos=False) == []


def test_the_demo_anchor_holds_what_the_build_writes(tmp_path: Path) -> None:
    """One source for the byte tokenizer and its chat template: the packaged files are
    exactly what `hmem build` writes today."""
    write_byte_tokenizer(tmp_path, model_max_length=demo_config().max_seq_len)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (DEMO_ANCHOR / name).read_text(), name
    assert not (DEMO_ANCHOR / "special_tokens_map.json").exists()  # transformers 5 needs none


def test_an_anchor_without_tokenizer_config_loads_with_no_chat_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(TOKENIZER_JSON_BEFORE_HF_LAYOUT.encode())
    tok = AnchorTokenizer.from_dir(tmp_path, demo_config())
    assert tok.config == {}
    assert tok.chat_template is None
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")  # named from config.json's ids
    assert tok.encode("hi") == [1, 74, 75]
    with pytest.raises(ChatTemplateError, match=r"no chat template; start the server with --chat"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    overridden = AnchorTokenizer.from_dir(tmp_path, demo_config(), chat_template=CHAT_TEMPLATE)
    assert overridden.render_chat([{"role": "user", "content": "hi"}]).startswith("<s><|user|>")


def test_a_bos_token_that_is_not_config_jsons_is_refused(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path, model_max_length=512)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "</s>"}))
    with pytest.raises(
        CheckpointError, match=r"bos_token '</s>' \(id 2\) but config.json's bos_token_id is 1"
    ):
        AnchorTokenizer.from_dir(tmp_path, demo_config())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        AnchorTokenizer.from_dir(tmp_path, demo_config())


def _before_hf_layout() -> str:
    """The demo anchor's tokenizer.json as banks built before tokenizer_config.json have it."""
    data = json.loads((DEMO_ANCHOR / "tokenizer.json").read_text())
    return json.dumps({**data, "post_processor": None})


TOKENIZER_JSON_BEFORE_HF_LAYOUT = _before_hf_layout()
