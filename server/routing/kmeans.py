"""Balanced hierarchical k-means: the centroid tree a bank's router is built from.

Level by level, every level-l cluster is split into `branching` children using only its own
points, so the children of node n are nodes `n*b .. n*b + b-1` (the `CentroidTree` layout). All
clusters of a level are split at once: their points are packed into a padded
[clusters, max points, dim] batch and every step (k-means++ seeding, distances, assignment,
centroid update) runs batched over it.

Choices, as the paper (`docs/paper.md` §3) and the calibration run (`docs/longtail.md`, finding 2)
suggest:
- **Spherical** (default): points are L2-normalised and centroids renormalised after every
  update, so nearest-L2 routing equals highest cosine. Plain centroids routed rare names badly.
- **Greedy k-means++** seeding from a seeded `torch.Generator`: deterministic per seed.
- **Balance**: no cluster holds more than `cap = floor(balance * n / b)` of its parent's n points
  (never below `ceil(n / b)`, the least that fits everyone). Assignment is capacity-constrained
  and greedy by margin, in rounds: every unassigned point proposes to its nearest centroid with
  room; a centroid accepts proposers in order of their margin (distance to their second-nearest
  open centroid minus distance to the nearest; a large margin loses most by being moved), up to
  its room; the rest try again next round. A round with a rejection fills a centroid, so there
  are at most b + 1 rounds. A centroid left with no points keeps its previous position.
- **Small clusters**: a cluster with fewer than b points still gets b children: its points (one
  child each) and then copies of its own centroid moved by a small deterministic perturbation
  (1e-3 of the centroid's norm, from the seeded generator), so every child id exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from server.routing.tree import CentroidTree

_PERTURBATION = 1e-3


@dataclass(frozen=True)
class HierarchicalClustering:
    """A fitted tree and the balanced cluster of every training point at every level.

    `node_ids` is the capacity-constrained assignment; greedy routing (`tree.route`) of the same
    point is unconstrained and can pick another cluster where balancing moved the point.
    """

    tree: CentroidTree
    node_ids: Tensor  # [N, levels] long: each point's node id per level (capacity-balanced)


def hierarchical_kmeans(
    x: Tensor,
    *,
    branching: int,
    levels: int,
    iters: int = 20,
    seed: int = 0,
    balance: float = 1.5,
    spherical: bool = True,
) -> CentroidTree:
    """Fit a `CentroidTree` to points x [N, dim] (see the module docstring for the method)."""
    return cluster_hierarchically(
        x,
        branching=branching,
        levels=levels,
        iters=iters,
        seed=seed,
        balance=balance,
        spherical=spherical,
    ).tree


def cluster_hierarchically(
    x: Tensor,
    *,
    branching: int,
    levels: int,
    iters: int = 20,
    seed: int = 0,
    balance: float = 1.5,
    spherical: bool = True,
) -> HierarchicalClustering:
    """As `hierarchical_kmeans`, also returning each point's balanced node id per level."""
    if x.dim() != 2 or x.shape[0] < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [N >= 1, dim], got {x.dtype} {tuple(x.shape)}")
    if branching < 2 or levels < 1 or iters < 1:
        raise ValueError(
            f"need branching >= 2, levels >= 1, iters >= 1; got {branching}, {levels}, {iters}"
        )
    if not balance >= 1.0:
        raise ValueError(f"balance must be at least 1.0 (a multiple of the mean), got {balance}")
    gen = torch.Generator().manual_seed(seed)
    pts = x.detach().to(torch.float32)
    pts = F.normalize(pts, dim=1) if spherical else pts.clone()
    root = pts.mean(dim=0, keepdim=True)  # (1, dim): level 0 has one node, the root
    parent_centroids = F.normalize(root, dim=1) if spherical else root
    parent = torch.zeros(pts.shape[0], dtype=torch.long)
    out: list[Tensor] = []
    node_ids = torch.empty(pts.shape[0], levels, dtype=torch.long)
    for level in range(levels):
        parent_centroids, parent = _split_level(
            pts,
            parent,
            parent_centroids,
            branching=branching,
            iters=iters,
            balance=balance,
            spherical=spherical,
            gen=gen,
        )
        out.append(parent_centroids)
        node_ids[:, level] = parent
    return HierarchicalClustering(tree=CentroidTree(out, branching=branching), node_ids=node_ids)


def _positions(group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Each item's position within its group (in input order) and the group sizes."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(group)
    pos[order] = torch.arange(group.shape[0]) - starts[group[order]]
    return pos, counts


def _split_level(
    pts: Tensor,
    parent: Tensor,
    parent_centroids: Tensor,
    *,
    branching: int,
    iters: int,
    balance: float,
    spherical: bool,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Split every parent into `branching` children: (centroids [P*b, dim], child node [N])."""
    b, dim = branching, pts.shape[1]
    P = parent_centroids.shape[0]
    counts = torch.bincount(parent, minlength=P)
    cents = torch.empty(P, b, dim)
    child = torch.empty_like(parent)
    big = counts >= b

    small_ids = torch.nonzero(~big).squeeze(1)
    if small_ids.numel():
        base = parent_centroids[small_ids]  # (S, dim)
        scale = _PERTURBATION * base.norm(dim=1).where(base.norm(dim=1) > 0, 1.0)
        noise = torch.randn(small_ids.numel(), b, dim, generator=gen) * scale[:, None, None]
        cents[small_ids] = base[:, None, :] + noise  # (S, b, dim)
        in_small = ~big[parent]
        pos, _ = _positions(parent[in_small], P)
        cents[parent[in_small], pos] = pts[in_small]
        child[in_small] = parent[in_small] * b + pos
        if spherical:
            cents[small_ids] = F.normalize(cents[small_ids], dim=2)

    big_ids = torch.nonzero(big).squeeze(1)
    if big_ids.numel():
        Q = big_ids.numel()
        lut = torch.full((P,), -1, dtype=torch.long)
        lut[big_ids] = torch.arange(Q)
        in_big = big[parent]
        g = lut[parent[in_big]]
        pos, sizes = _positions(g, Q)
        X = torch.zeros(Q, int(sizes.max()), dim)  # (Q, n, dim), zero rows are padding
        X[g, pos] = pts[in_big]
        valid = torch.zeros(Q, X.shape[1], dtype=torch.bool)
        valid[g, pos] = True
        cap = torch.maximum(
            torch.ceil(sizes / b), torch.floor(balance * sizes.to(torch.float64) / b)
        ).to(torch.long)
        C = _kmeanspp(X, valid, b, gen)
        labels = _lloyd(X, valid, C, cap=cap, iters=iters, spherical=spherical)
        cents[big_ids] = C
        child[in_big] = parent[in_big] * b + labels[g, pos]
    return cents.reshape(P * b, dim), child


def _sqdist(X: Tensor, C: Tensor) -> Tensor:
    """Squared L2 distances [Q, n, b] between points X [Q, n, dim] and centroids C [Q, b, dim]."""
    cross = torch.bmm(X, C.transpose(1, 2))  # (Q, n, b)
    d2 = X.pow(2).sum(2, keepdim=True) - 2.0 * cross + C.pow(2).sum(2)[:, None, :]
    return d2.clamp_min(0.0)


def _kmeanspp(X: Tensor, valid: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeds [Q, k, dim], batched over groups; padding is never picked.

    As in scikit-learn, each step samples `2 + log k` candidates by D^2 weight and keeps the one
    that lowers the total squared distance most: plain k-means++ too often seeds one true
    cluster twice, which Lloyd iterations rarely undo.
    """
    Q = X.shape[0]
    rows = torch.arange(Q)[:, None]  # (Q, 1)
    trials = 2 + int(math.log(k))
    weights = valid.to(torch.float32)
    C = torch.empty(Q, k, X.shape[2])
    mind2 = torch.full(valid.shape, math.inf)
    for j in range(k):
        n_cand = 1 if j == 0 else trials
        cand = torch.multinomial(weights, n_cand, replacement=True, generator=gen)  # (Q, t)
        d2 = torch.minimum(mind2[:, :, None], _sqdist(X, X[rows, cand]))  # (Q, n, t)
        potential = (d2 * valid[:, :, None]).sum(1)  # (Q, t)
        best = torch.argmin(potential, dim=1)  # (Q,)
        C[:, j] = X[rows.squeeze(1), cand[rows.squeeze(1), best]]
        mind2 = d2[rows.squeeze(1), :, best]  # (Q, n)
        weights = mind2 * valid
        # Every point of a group sits on a seed already (duplicates): fall back to uniform.
        empty = weights.sum(1) <= 0
        weights[empty] = valid[empty].to(torch.float32)
    return C


def _lloyd(
    X: Tensor, valid: Tensor, C: Tensor, *, cap: Tensor, iters: int, spherical: bool
) -> Tensor:
    """Balanced Lloyd iterations, updating C [Q, b, dim] in place; returns labels [Q, n]."""
    Q, b, dim = C.shape
    groups = torch.arange(Q)[:, None] * b  # (Q, 1)
    labels = torch.full(valid.shape, -1, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(_sqdist(X, C), valid, cap)
        flat = (groups + new)[valid]  # (N,) group-major centroid index
        sums = torch.zeros(Q * b, dim).index_add_(0, flat, X[valid])
        counts = torch.bincount(flat, minlength=Q * b)
        means = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
        keep = counts > 0
        if spherical:
            norms = means.norm(dim=1)
            keep &= norms > 0
            means = means / norms.clamp_min(1e-12)[:, None]
        C.view(Q * b, dim)[keep] = means[keep]
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _balanced_assign(d2: Tensor, valid: Tensor, cap: Tensor) -> Tensor:
    """Capacity-constrained greedy assignment by margin (module docstring): labels [Q, n]."""
    Q, n, b = d2.shape
    labels = torch.full((Q, n), -1, dtype=torch.long)
    room = cap[:, None].expand(Q, b).clone()  # (Q, b)
    todo = valid.clone()
    while bool(todo.any()):
        qi, pi = torch.nonzero(todo, as_tuple=True)
        dc = d2[qi, pi].masked_fill(room[qi] <= 0, math.inf)  # (m, b), full centroids excluded
        choice = torch.argmin(dc, dim=1)
        two = torch.topk(dc, 2, dim=1, largest=False).values  # (m, 2)
        margin = two[:, 1] - two[:, 0]  # inf when only one centroid has room: all equal then
        group = qi * b + choice
        by_margin = torch.argsort(margin, descending=True, stable=True)
        order = by_margin[torch.argsort(group[by_margin], stable=True)]
        g = group[order]
        gcount = torch.bincount(g, minlength=Q * b)
        rank = torch.arange(g.shape[0]) - (torch.cumsum(gcount, 0) - gcount)[g]
        accepted = order[rank < room.view(-1)[g]]
        labels[qi[accepted], pi[accepted]] = choice[accepted]
        todo[qi[accepted], pi[accepted]] = False
        room.view(-1).sub_(torch.bincount(group[accepted], minlength=Q * b))
    return labels
