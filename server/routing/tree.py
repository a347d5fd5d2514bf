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


def node_ids(path: Sequence[int], branching: int) -> tuple[int, ...]:
    """The node id at each level of a path of child indices (level 1 first): the child i of
    node n is node `n * branching + i` at the next level."""
    nodes, node = [], 0
    for i in path:
        node = node * branching + i
        nodes.append(node)
    return tuple(nodes)


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
        x, depth = self._check_route(embeddings, levels)
        if x.shape[0] == 1:
            return self._route_one(x[0], depth)
        root = torch.zeros(x.shape[0], dtype=torch.long)  # the root is node 0 of level 0
        return RouteResult(*self._descend(x, root, 0, depth))

    def level1_ranking(self, embeddings: Tensor) -> Tensor:
        """Level-1 node ids of each of `embeddings` [N, dim], nearest centroid first: [N, b].

        The distances `route` compares, so column 0 is the level-1 node `route` picks; ties are
        ranked lowest id first, as `route` breaks them.
        """
        x, _ = self._check_route(embeddings, None)
        N, b = x.shape[0], self.branching
        ranking = torch.empty(N, b, dtype=torch.long)
        chunk = max(1, _ROUTE_CHUNK_ELEMENTS // (b * self.dim))
        for start in range(0, N, chunk):
            xs = x[start : start + chunk]
            _, d2 = self._children_d2(xs, torch.zeros(xs.shape[0], dtype=torch.long), 0)
            ranking[start : start + xs.shape[0]] = torch.argsort(d2, dim=1, stable=True)
        return ranking

    def route_under(
        self, embeddings: Tensor, level1: Tensor, *, levels: int | None = None
    ) -> RouteResult:
        """Paths of `embeddings` [N, dim] that start at the given level-1 nodes `level1` [N]
        and go on greedily below them, as `route` does below the level-1 node it picks."""
        x, depth = self._check_route(embeddings, levels)
        N, b = x.shape[0], self.branching
        level1 = level1.to(torch.long)
        if tuple(level1.shape) != (N,) or (
            N and not 0 <= int(level1.min()) <= int(level1.max()) < b
        ):
            raise ValueError(
                f"level1 must be [{N}] node ids in 0..{b - 1}, got shape {tuple(level1.shape)}"
            )
        d1 = (self.centroids[0][level1] - x).pow(2).sum(dim=1).sqrt()  # (N,)
        nodes, choices, dists = self._descend(x, level1, 1, depth)
        return RouteResult(
            node_ids=torch.cat([level1[:, None], nodes], dim=1),
            child_index=torch.cat([level1[:, None], choices], dim=1),
            distances=torch.cat([d1[:, None], dists], dim=1),
        )

    def _check_route(self, embeddings: Tensor, levels: int | None) -> tuple[Tensor, int]:
        """The embeddings as float32 and the depth to route to, both checked."""
        depth = self.levels if levels is None else levels
        if not 1 <= depth <= self.levels:
            raise ValueError(f"levels must be in 1..{self.levels} for this tree, got {levels}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)}, expected [N, {self.dim}]; "
                "was the text embedded with the bank's embedder?"
            )
        return embeddings.to(torch.float32), depth

    def _children_d2(self, xs: Tensor, parent: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """The children (n, b) of `parent` (n,) (nodes of level `level`, 0 = the root) and their
        squared distances (n, b) to `xs` (n, dim)."""
        children = parent[:, None] * self.branching + torch.arange(self.branching)  # (n, b)
        cand = self.centroids[level][children]  # (n, b, dim)
        return children, (cand - xs[:, None, :]).pow(2).sum(dim=2)

    def _descend(
        self, x: Tensor, parent: Tensor, first: int, depth: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Greedy from `parent` [N] (nodes at level `first`; level 0 is the root) down to level
        `depth`: node ids, child indices and distances [N, depth - first] of levels first+1.."""
        N, b = x.shape[0], self.branching
        node_ids = torch.empty(N, depth - first, dtype=torch.long)
        child_index = torch.empty(N, depth - first, dtype=torch.long)
        distances = torch.empty(N, depth - first, dtype=torch.float32)
        chunk = max(1, _ROUTE_CHUNK_ELEMENTS // (b * self.dim))
        for start in range(0, N, chunk):
            xs = x[start : start + chunk]  # (n, dim)
            rows = slice(start, start + xs.shape[0])
            node = parent[rows]
            for col, level in enumerate(range(first, depth)):
                children, d2 = self._children_d2(xs, node, level)
                choice = torch.argmin(d2, dim=1)  # first minimum: ties go to the lowest index
                node = children.gather(1, choice[:, None]).squeeze(1)
                node_ids[rows, col] = node
                child_index[rows, col] = choice
                distances[rows, col] = d2.gather(1, choice[:, None]).squeeze(1).sqrt()
        return node_ids, child_index, distances

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
