"""The centroid tree and the router: from a prompt's embedding to its cluster path.

Level l (1-based) of a tree with branching b holds `b**l` centroids in node-id order; the
children of node n at level l are nodes `n*b .. n*b + b-1` at level l+1. Routing is greedy, as in
the paper: the nearest (L2) of the b level-1 centroids, then at each next level the nearest among
the chosen node's children only. It is vectorised over a batch and deterministic; ties go to the
lowest child index.

`Router` pairs an embedder with a tree and owns router.safetensors: the centroids as
"centroids.L{l}" and the embedder's state as "embedder.*". The embedder's spec lives in the bank
manifest and is checked against what is loaded.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from server.routing.embedders import Embedder, SparseEmbedder, load_embedder
from server.routing.errors import CentroidTreeError, RouterFileError, RouterFileNotFoundError

CENTROIDS_PREFIX = "centroids.L"
EMBEDDER_PREFIX = "embedder."
# Rows routed at once: bounds the [rows, branching, dim] gather of children's centroids.
_ROUTE_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class RouteResult:
    """Where each of N inputs goes: one column per routed level (level 1 first)."""

    node_ids: Tensor  # [N, L] long: global node id within each level
    child_index: Tensor  # [N, L] long: 0..branching-1, the paper's path (i1, ..., iL)
    distances: Tensor  # [N, L] float: L2 distance to the chosen centroid

    def path(self, i: int) -> tuple[int, ...]:
        """The cluster path (i1, ..., iL) of input i."""
        return tuple(int(c) for c in self.child_index[i].tolist())


class CentroidTree:
    """Centroids of a hierarchical clustering, level by level, children in node-id order."""

    def __init__(self, centroids: Sequence[Tensor], *, branching: int) -> None:
        if branching < 2:
            raise CentroidTreeError(f"branching must be at least 2, got {branching}")
        if not centroids:
            raise CentroidTreeError("a centroid tree needs at least one level")
        dim = int(centroids[0].shape[-1]) if centroids[0].dim() == 2 else -1
        for level, c in enumerate(centroids, start=1):
            name = f"{CENTROIDS_PREFIX}{level}"
            expected = (branching**level, dim)
            if c.dim() != 2 or tuple(c.shape) != expected or dim < 1:
                raise CentroidTreeError(
                    f"{name} has shape {tuple(c.shape)}, expected {expected} "
                    f"(branching**{level} rows of the level-1 dimension)"
                )
            if not c.is_floating_point():
                raise CentroidTreeError(f"{name} has dtype {c.dtype}; centroids must be float")
            if not bool(torch.isfinite(c).all()):
                raise CentroidTreeError(f"{name} holds NaN or infinite values")
        self.branching = branching
        self.dim = dim
        self.centroids = [c.to(torch.float32).contiguous() for c in centroids]
        self.sq_norms = [c.pow(2).sum(dim=1) for c in self.centroids]  # [n] per level
        self._np_centroids = [c.numpy() for c in self.centroids]  # views (path_sparse)
        self._np_sq_norms = [n.numpy() for n in self.sq_norms]

    @property
    def levels(self) -> int:
        return len(self.centroids)

    def route(self, embeddings: Tensor, *, levels: int | None = None) -> RouteResult:
        """Greedy nearest-centroid paths of `embeddings` [N, dim] through the first `levels`."""
        depth = self.levels if levels is None else levels
        if not 1 <= depth <= self.levels:
            raise ValueError(f"levels must be in 1..{self.levels} for this tree, got {levels}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)}, expected [N, {self.dim}]; "
                "was the text embedded with the bank's embedder?"
            )
        x = embeddings.to(torch.float32)
        N, b = x.shape[0], self.branching
        if N == 1:
            return self._route_one(x[0], depth)
        node_ids = torch.empty(N, depth, dtype=torch.long)
        child_index = torch.empty(N, depth, dtype=torch.long)
        distances = torch.empty(N, depth, dtype=torch.float32)
        chunk = max(1, _ROUTE_CHUNK_ELEMENTS // (b * self.dim))
        offsets = torch.arange(b)
        for start in range(0, N, chunk):
            xs = x[start : start + chunk]  # (n, dim)
            parent = torch.zeros(xs.shape[0], dtype=torch.long)  # the root is node 0 of level 0
            for level in range(depth):
                children = parent[:, None] * b + offsets  # (n, b)
                cand = self.centroids[level][children]  # (n, b, dim)
                d2 = (cand - xs[:, None, :]).pow(2).sum(dim=2)  # (n, b)
                choice = torch.argmin(d2, dim=1)  # first minimum: ties go to the lowest index
                parent = children.gather(1, choice[:, None]).squeeze(1)
                rows = slice(start, start + xs.shape[0])
                node_ids[rows, level] = parent
                child_index[rows, level] = choice
                distances[rows, level] = d2.gather(1, choice[:, None]).squeeze(1).sqrt()
        return RouteResult(node_ids=node_ids, child_index=child_index, distances=distances)

    def _route_one(self, x: Tensor, depth: int) -> RouteResult:
        """One input (a serving request): each level's children are a contiguous slice of its
        centroids, so they are read in place instead of gathered; same arithmetic as `route`."""
        b = self.branching
        node_ids = torch.empty(1, depth, dtype=torch.long)
        child_index = torch.empty(1, depth, dtype=torch.long)
        distances = torch.empty(1, depth, dtype=torch.float32)
        parent = 0
        for level in range(depth):
            cand = self.centroids[level][parent * b : (parent + 1) * b]  # (b, dim), a view
            d2 = (cand - x).pow(2).sum(dim=1)  # (b,)
            choice = int(torch.argmin(d2))  # first minimum: ties go to the lowest index
            parent = parent * b + choice
            node_ids[0, level] = parent
            child_index[0, level] = choice
            distances[0, level] = d2[choice].sqrt()
        return RouteResult(node_ids=node_ids, child_index=child_index, distances=distances)

    def path_sparse(
        self, buckets: Sequence[int], values: Sequence[float], *, levels: int | None = None
    ) -> tuple[list[int], list[int], list[float]]:
        """Route one sparse input: the non-zero `buckets` of a vector and their `values`.

        d2 = |c|^2 - 2 c.x + |x|^2 reads only the input's non-zero columns of each candidate
        centroid (b x nnz numbers, not b x dim): the same choice as `route` up to float rounding.
        Returns plain lists (node ids, child indices, distances): no tensors are made, which is
        what routing one prompt between requests can afford.
        """
        depth = self.levels if levels is None else levels
        if not 1 <= depth <= self.levels:
            raise ValueError(f"levels must be in 1..{self.levels} for this tree, got {levels}")
        if len(buckets) != len(values):
            raise ValueError("buckets and values must be of one length")
        if buckets and not 0 <= min(buckets) <= max(buckets) < self.dim:
            raise ValueError(f"buckets must be in 0..{self.dim - 1}")
        b = self.branching
        # numpy over views of the centroids: a handful of small ops, far lighter than torch's.
        cols = np.asarray(buckets, dtype=np.int64)
        x = np.asarray(values, dtype=np.float32)
        x_sq = float(x @ x)
        nodes: list[int] = []
        choices: list[int] = []
        dists: list[float] = []
        parent = 0
        for level in range(depth):
            start = parent * b
            dots = self._np_centroids[level][start : start + b][:, cols] @ x  # (b,)
            d2 = (self._np_sq_norms[level][start : start + b] - 2.0 * dots + x_sq).tolist()
            choice = min(range(b), key=d2.__getitem__)  # first minimum, as argmin
            parent = parent * b + choice
            nodes.append(parent)
            choices.append(choice)
            dists.append(math.sqrt(max(d2[choice], 0.0)))
        return nodes, choices, dists

    def to_tensors(self) -> dict[str, Tensor]:
        return {f"{CENTROIDS_PREFIX}{i}": c for i, c in enumerate(self.centroids, start=1)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], *, branching: int) -> CentroidTree:
        """Rebuild from "centroids.L1" .. "centroids.LK"; levels must be contiguous from 1."""
        levels: dict[int, Tensor] = {}
        for name, t in tensors.items():
            suffix = name.removeprefix(CENTROIDS_PREFIX)
            if suffix == name or not suffix.isdigit() or int(suffix) < 1:
                raise CentroidTreeError(
                    f"unexpected tensor {name!r}; centroid tensors are named "
                    f"{CENTROIDS_PREFIX}1, {CENTROIDS_PREFIX}2, ..."
                )
            levels[int(suffix)] = t
        if not levels:
            raise CentroidTreeError(f"no centroid tensors ({CENTROIDS_PREFIX}1, ...) were given")
        for level in range(1, max(levels) + 1):
            if level not in levels:
                raise CentroidTreeError(
                    f"tensor {CENTROIDS_PREFIX}{level} is missing (levels up to "
                    f"{max(levels)} are present)"
                )
        return cls([levels[i] for i in range(1, len(levels) + 1)], branching=branching)


class Router:
    """An embedder and a centroid tree: texts in, cluster paths out."""

    def __init__(self, embedder: Embedder, tree: CentroidTree) -> None:
        if embedder.dim != tree.dim:
            raise CentroidTreeError(
                f"the embedder makes {embedder.dim}-d vectors but the centroids are "
                f"{tree.dim}-d; build the tree from this embedder's embeddings"
            )
        self.embedder = embedder
        self.tree = tree
        self._sparse = embedder if isinstance(embedder, SparseEmbedder) else None

    def route_texts(self, texts: Sequence[str], *, levels: int | None = None) -> RouteResult:
        if len(texts) == 1 and self._sparse is not None:  # a prompt: the sparse path
            nodes, choices, dists = self.route_one(texts[0], levels=levels)
            return RouteResult(
                node_ids=torch.tensor([nodes]),
                child_index=torch.tensor([choices]),
                distances=torch.tensor([dists], dtype=torch.float32),
            )
        return self.tree.route(self.embedder.embed(texts), levels=levels)

    @property
    def routes_sparsely(self) -> bool:
        """One prompt is routed from its non-zero terms (cheap: about 0.1 ms, no torch op)."""
        return self._sparse is not None

    def route_one(
        self, text: str, *, levels: int | None = None
    ) -> tuple[list[int], list[int], list[float]]:
        """One prompt's (node ids, child indices, distances), level 1 first, as plain lists."""
        if self._sparse is not None:
            buckets, values = self._sparse.sparse_terms(text)
            return self.tree.path_sparse(buckets, values, levels=levels)
        r = self.route_texts([text], levels=levels)
        return r.node_ids[0].tolist(), r.child_index[0].tolist(), r.distances[0].tolist()

    def save(self, path: str | Path) -> None:
        """Write router.safetensors atomically (a crash never leaves a partial file)."""
        target = Path(path)
        tensors = self.tree.to_tensors()
        for name, t in self.embedder.state_tensors().items():
            tensors[EMBEDDER_PREFIX + name] = t
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls,
        path: str | Path,
        spec: Mapping[str, Any],
        *,
        branching: int,
        levels: int,
        minilm_dir: str | Path | None = None,
    ) -> Router:
        """Load router.safetensors, checked against the manifest's embedder spec and shape."""
        source = Path(path)
        if not source.is_file():
            raise RouterFileNotFoundError(f"router file {source} does not exist")
        try:
            tensors = load_file(source)
        except (SafetensorError, OSError) as exc:
            raise RouterFileError(f"cannot read {source} as safetensors: {exc}") from exc
        centroids = {k: v for k, v in tensors.items() if not k.startswith(EMBEDDER_PREFIX)}
        state = {
            k.removeprefix(EMBEDDER_PREFIX): v
            for k, v in tensors.items()
            if k.startswith(EMBEDDER_PREFIX)
        }
        tree = CentroidTree.from_tensors(centroids, branching=branching)
        if tree.levels != levels:
            raise CentroidTreeError(
                f"{source} holds {tree.levels} levels of centroids, the manifest says {levels}"
            )
        return cls(load_embedder(spec, state, minilm_dir=minilm_dir), tree)
