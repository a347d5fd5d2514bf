"""Hashed TF-IDF: stable across processes, unit rows, IDF that keeps rare names sharp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from server.routing import EmbedderMismatchError, HashedTfidfEmbedder, load_embedder

TEXTS = ["The atomic number of Iron is 26.", "Einsteinium was found in 1952 debris.", "", "?!"]
ELEMENTS = {
    "Iron": 26,
    "Gold": 79,
    "Silver": 47,
    "Copper": 29,
    "Neon": 10,
    "Argon": 18,
    "Helium": 2,
    "Carbon": 6,
    "Oxygen": 8,
    "Sodium": 11,
    "Zinc": 30,
    "Tin": 50,
}
ROOT = Path(__file__).resolve().parents[3]


def _corpus() -> list[str]:
    docs = [f"The atomic number of {name} is {z}." for name, z in ELEMENTS.items()]
    docs += [
        f"{name} is an element; the atomic number of {name} is {z}." for name, z in ELEMENTS.items()
    ]
    docs.append("Einsteinium is a synthetic element first identified in 1952 fallout.")
    return docs


def test_same_embedding_in_another_process() -> None:
    script = (
        "import json, sys\n"
        "from server.routing import HashedTfidfEmbedder\n"
        "e = HashedTfidfEmbedder(dim=4096, seed=7).embed(json.loads(sys.argv[1]))\n"
        "print(json.dumps(e.tolist()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's own hash() would differ
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    theirs = torch.tensor(json.loads(out.stdout))
    assert torch.equal(theirs, HashedTfidfEmbedder(dim=4096, seed=7).embed(TEXTS))


def test_seed_changes_the_hashing() -> None:
    a = HashedTfidfEmbedder(dim=4096, seed=1).embed(TEXTS[:1])
    b = HashedTfidfEmbedder(dim=4096, seed=2).embed(TEXTS[:1])
    assert not torch.equal(a, b)


def test_rows_are_unit_norm_even_without_words() -> None:
    emb = HashedTfidfEmbedder(dim=1024).fit(_corpus())
    out = emb.embed(TEXTS)
    assert out.dtype == torch.float32
    assert out.shape == (len(TEXTS), 1024)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
    assert torch.equal(out[2], out[3])  # "" and "?!" have no word tokens: the same row
    assert emb.embed([]).shape == (0, 1024)


def test_case_and_punctuation_are_ignored() -> None:
    emb = HashedTfidfEmbedder(dim=1024)
    a, b = emb.embed(["Atomic number of IRON!", "atomic number of iron"])
    assert torch.equal(a, b)


def test_sublinear_tf_and_bigrams() -> None:
    emb = HashedTfidfEmbedder(dim=1 << 16, ngram_max=2)
    assert emb.grams("a b a") == {"a": 2, "b": 1, "a b": 1, "b a": 1}
    (row,) = emb.embed(["iron iron iron iron"])  # unigram tf 1 + log 4, bigram 1 + log 3
    values = sorted(row[row != 0].abs().tolist())
    ratio = (1 + torch.log(torch.tensor(4.0))) / (1 + torch.log(torch.tensor(3.0)))
    assert len(values) == 2
    assert values[1] / values[0] == pytest.approx(float(ratio), rel=1e-5)


def test_similar_texts_are_closer_than_unrelated_ones() -> None:
    emb = HashedTfidfEmbedder(dim=4096).fit(_corpus())
    a, b, c = emb.embed(
        ["the melting point of gold", "gold melting point is high", "jazz music in new orleans"]
    )
    assert float(a @ b) > 0.3
    assert float(a @ c) == pytest.approx(0.0, abs=0.05)


def test_rare_name_dominates_after_fit() -> None:
    corpus = _corpus()
    iron, einsteinium = corpus[0], corpus[-1]
    query = "atomic number of Einsteinium"
    emb = HashedTfidfEmbedder(dim=1 << 14)
    q, d_iron, d_ein = emb.embed([query, iron, einsteinium])
    assert float(q @ d_iron) > float(q @ d_ein)  # raw counts: the shared template wins
    emb.fit(corpus)
    q, d_iron, d_ein = emb.embed([query, iron, einsteinium])
    assert float(q @ d_ein) > 1.1 * float(q @ d_iron)  # after IDF: the rare name wins


def test_fit_sets_smoothed_idf() -> None:
    emb = HashedTfidfEmbedder(dim=1 << 16, ngram_max=1, idf_power=1).fit(
        ["iron gold", "iron", "iron tin"]
    )
    (row,) = emb.embed(["iron"])
    bucket = int(row.abs().argmax())
    assert float(emb.idf[bucket]) == pytest.approx(1.0)  # log(4 / 4) + 1
    (row,) = emb.embed(["tin"])
    bucket = int(row.abs().argmax())
    assert float(emb.idf[bucket]) == pytest.approx(float(torch.log(torch.tensor(2.0))) + 1)
    with pytest.raises(ValueError, match="at least one text"):
        emb.fit([])


def test_idf_power_raises_the_fitted_weights() -> None:
    corpus = ["iron gold", "iron", "iron tin"]
    plain = HashedTfidfEmbedder(dim=1 << 16, ngram_max=1, idf_power=1).fit(corpus)
    squared = HashedTfidfEmbedder(dim=1 << 16, ngram_max=1).fit(corpus)
    assert torch.allclose(squared.idf, plain.idf.pow(2))
    # Squared weights give a rare word a larger share of a text: "tin" outweighs "iron" more.
    (p_row,), (s_row,) = plain.embed(["iron tin"]), squared.embed(["iron tin"])
    assert float(s_row.abs().max()) > float(p_row.abs().max())
    with pytest.raises(ValueError, match="idf_power"):
        HashedTfidfEmbedder(dim=8, idf_power=0)


def test_specs_without_idf_power_load_with_their_stored_weights() -> None:
    """Banks written before idf_power existed: the spec lacks it, the stored weights decide."""
    weights = torch.linspace(1.0, 3.0, 16)
    spec = {"kind": "hashed-tfidf", "dim": 16, "ngram_max": 2, "seed": 0}
    emb = load_embedder(spec, {"idf": weights})
    assert isinstance(emb, HashedTfidfEmbedder)
    assert emb.idf_power == 1.0
    assert torch.equal(emb.idf, weights)


def test_idf_round_trips_through_state_tensors() -> None:
    emb = HashedTfidfEmbedder(dim=2048, ngram_max=2, seed=3).fit(_corpus())
    assert emb.spec == {
        "kind": "hashed-tfidf", "dim": 2048, "ngram_max": 2, "seed": 3, "idf_power": 2.0
    }  # fmt: skip
    json.dumps(emb.spec)
    again = load_embedder(emb.spec, emb.state_tensors())
    assert again.spec == emb.spec
    assert torch.equal(again.embed(TEXTS), emb.embed(TEXTS))


@pytest.mark.parametrize(
    ("spec", "tensors", "message"),
    [
        ({"kind": "word2vec", "dim": 8}, {}, "unknown embedder kind 'word2vec'"),
        (
            {"kind": "hashed-tfidf", "dim": 16, "ngram_max": 2, "seed": 0},
            {"idf": torch.ones(8)},
            r"embedder\.idf has shape \(8,\) but the spec says dim=16",
        ),
        (
            {"kind": "hashed-tfidf", "dim": 8, "ngram_max": 2, "seed": 0},
            {},
            r"missing tensors \['idf'\]",
        ),
        (
            {"kind": "hashed-tfidf", "dim": 8, "ngram_max": 2, "seed": 0},
            {"idf": torch.ones(8), "extra": torch.ones(1)},
            r"unexpected tensors \['extra'\]",
        ),
        (
            {"kind": "hashed-tfidf", "dim": "8", "ngram_max": 2, "seed": 0},
            {"idf": torch.ones(8)},
            "'dim' should be an integer",
        ),
        (
            {"kind": "hashed-tfidf", "dim": 8, "ngram_max": 0, "seed": 0},
            {"idf": torch.ones(8)},
            "ngram_max",
        ),
        (
            {"kind": "hashed-tfidf", "dim": 8, "ngram_max": 2, "seed": 0, "idf_power": "2"},
            {"idf": torch.ones(8)},
            "idf_power",
        ),
        (
            {"kind": "hashed-tfidf", "dim": 8, "ngram_max": 2, "seed": 0, "idf_power": 0.0},
            {"idf": torch.ones(8)},
            "idf_power must be in",
        ),
    ],
)
def test_bad_specs_are_refused(spec: dict[str, Any], tensors: dict[str, Any], message: str) -> None:
    with pytest.raises(EmbedderMismatchError, match=message):
        load_embedder(spec, tensors)
