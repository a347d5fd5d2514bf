"""The anchor tokenizer: a real tokenizer.json trained here, and refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server.model.config import PRESETS
from server.model.errors import CheckpointError
from server.tokenizer import AnchorTokenizer

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
