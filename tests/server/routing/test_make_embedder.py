"""The named embedders a build can ask for: each fitted on a corpus, recorded in a spec that
`load_embedder` rebuilds, and an unknown name refused with the choices."""

from __future__ import annotations

import pytest
import torch

from server.routing import EMBEDDERS, HashedTfidfEmbedder, load_embedder, make_embedder

CORPUS = [
    "The atomic number of Iron is 26.",
    "Gold has the atomic number 79.",
    "The capital of Zorbin is Mavel.",
    "Ferries to Zorbin leave twice a week.",
    "Bake the bread until the crust turns golden.",
]


def test_hashed_tfidf_is_words_and_pairs_fitted_on_the_corpus() -> None:
    made = make_embedder("hashed-tfidf", CORPUS, dim=4096, seed=3)
    assert isinstance(made, HashedTfidfEmbedder)
    assert made.spec["ngram_max"] == 2
    fitted = HashedTfidfEmbedder(dim=4096, seed=3).fit(CORPUS)
    assert torch.equal(made.embed(CORPUS), fitted.embed(CORPUS))


def test_unigram_ignores_word_order_and_loads_from_its_spec() -> None:
    made = make_embedder("hashed-tfidf-unigram", CORPUS, dim=4096, seed=3)
    assert made.spec == {
        "kind": "hashed-tfidf",
        "dim": 4096,
        "ngram_max": 1,
        "seed": 3,
        "idf_power": 2.0,
    }
    a, b = made.embed(["capital of Zorbin", "Zorbin of capital"])
    assert torch.allclose(a, b)
    pairs = make_embedder("hashed-tfidf", CORPUS, dim=4096, seed=3)
    a, b = pairs.embed(["capital of Zorbin", "Zorbin of capital"])
    assert not torch.allclose(a, b)
    loaded = load_embedder(made.spec, made.state_tensors())
    assert torch.equal(loaded.embed(CORPUS), made.embed(CORPUS))


def test_minilm_is_the_packaged_model() -> None:
    made = make_embedder("minilm", CORPUS, dim=4096, seed=3)
    assert made.spec["kind"] == "minilm"
    assert made.dim == 384
    rows = made.embed(CORPUS[:2])
    assert torch.allclose(rows.norm(dim=1), torch.ones(2), atol=1e-5)


def test_every_named_embedder_is_made_and_others_refused() -> None:
    assert set(EMBEDDERS) == {"hashed-tfidf", "hashed-tfidf-unigram", "minilm"}
    with pytest.raises(ValueError, match="hashed-tfidf, hashed-tfidf-unigram, minilm"):
        make_embedder("bm25", CORPUS, dim=64, seed=0)
