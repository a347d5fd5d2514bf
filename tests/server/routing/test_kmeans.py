"""Balanced hierarchical k-means: recovers real clusters, respects the balance cap, seeded."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from server.routing import CentroidTree, cluster_hierarchically, hierarchical_kmeans


def _nested_clusters(
    seed: int, *, dim: int = 32, per_leaf: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """4 well-separated groups of 4 sub-clusters each; returns points and sub-cluster labels."""
    g = torch.Generator().manual_seed(seed)
    top = F.normalize(torch.randn(4, dim, generator=g), dim=1)
    sub = top.repeat_interleave(4, 0) + 0.4 / math.sqrt(dim) * torch.randn(16, dim, generator=g)
    labels = torch.arange(16).repeat_interleave(per_leaf)
    x = F.normalize(sub, dim=1)[labels] + 0.02 / math.sqrt(dim) * torch.randn(
        len(labels), dim, generator=g
    )
    return x, labels


def _is_bijection(truth: torch.Tensor, found: torch.Tensor) -> bool:
    pairs = set(zip(truth.tolist(), found.tolist(), strict=True))
    return len(pairs) == len(set(truth.tolist())) == len(set(found.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_well_separated_nested_clusters(seed: int) -> None:
    x, labels = _nested_clusters(seed)
    result = cluster_hierarchically(x, branching=4, levels=2, seed=seed)
    assert _is_bijection(labels // 4, result.node_ids[:, 0])
    assert _is_bijection(labels, result.node_ids[:, 1])
    # Greedy routing of the training points lands where the clustering put them.
    routed = result.tree.route(F.normalize(x, dim=1))
    assert torch.equal(routed.node_ids, result.node_ids)


def _max_over_mean(
    node_ids: torch.Tensor, *, branching: int, level: int
) -> list[tuple[int, float]]:
    """(parent size, largest child / cap bound) for every parent with at least b points."""
    sizes = torch.bincount(node_ids[:, level], minlength=branching ** (level + 1))
    out = []
    for parent_sizes in sizes.view(-1, branching):
        n = int(parent_sizes.sum())
        if n >= branching:
            bound = max(1.5 * n / branching, math.ceil(n / branching))
            out.append((n, int(parent_sizes.max()) / bound))
    return out


def test_balance_cap_holds_within_every_parent() -> None:
    g = torch.Generator().manual_seed(0)
    # Skewed data: most points in one tight blob, which plain k-means would leave in one cluster.
    blob = torch.randn(1, 16, generator=g) + 0.01 * torch.randn(2000, 16, generator=g)
    rest = torch.randn(1000, 16, generator=g)
    x = torch.cat([blob, rest])
    result = cluster_hierarchically(x, branching=8, levels=2, seed=0)
    for level in range(2):
        ratios = _max_over_mean(result.node_ids, branching=8, level=level)
        assert ratios
        assert all(r <= 1.0 for _, r in ratios), ratios
    # Each level-2 cluster lies inside its level-1 parent.
    assert torch.equal(result.node_ids[:, 1] // 8, result.node_ids[:, 0])


def test_deterministic_per_seed() -> None:
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(9))
    a = hierarchical_kmeans(x, branching=4, levels=2, seed=3)
    b = hierarchical_kmeans(x, branching=4, levels=2, seed=3)
    c = hierarchical_kmeans(x, branching=4, levels=2, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.centroids, b.centroids, strict=True))
    assert not torch.equal(a.centroids[0], c.centroids[0])


def test_spherical_centroids_are_unit_norm_and_plain_ones_are_means() -> None:
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(1)) * 5
    tree = hierarchical_kmeans(x, branching=4, levels=2)
    for c in tree.centroids:
        assert torch.allclose(c.norm(dim=1), torch.ones(c.shape[0]), atol=1e-5)
    plain = cluster_hierarchically(x, branching=4, levels=1, spherical=False)
    ids = plain.node_ids[:, 0]
    for node in range(4):
        assert torch.allclose(plain.tree.centroids[0][node], x[ids == node].mean(0), atol=1e-4)


def test_clusters_smaller_than_branching_still_get_every_child() -> None:
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(2))
    result = cluster_hierarchically(x, branching=4, levels=3)
    tree = result.tree
    assert [c.shape for c in tree.centroids] == [(4, 5), (16, 5), (64, 5)]
    assert all(bool(torch.isfinite(c).all()) for c in tree.centroids)
    again = CentroidTree.from_tensors(tree.to_tensors(), branching=4)
    assert torch.equal(again.centroids[2], tree.centroids[2])
    # A point alone in its cluster is a child centroid itself: its leaf is exactly it.
    leaves = tree.centroids[2][result.node_ids[:, 2]]
    assert torch.allclose(leaves, F.normalize(x, dim=1), atol=1e-6)
    # Children are distinct even where a cluster had too few points for them.
    assert torch.unique(tree.centroids[2], dim=0).shape[0] == 64


def test_ten_thousand_minilm_sized_points_fill_a_16_by_16_tree() -> None:
    # Scale check, not a timing: the build pipeline clusters corpora of this size.
    x = torch.randn(10_000, 384, generator=torch.Generator().manual_seed(0))
    result = cluster_hierarchically(x, branching=16, levels=2)
    assert [c.shape for c in result.tree.centroids] == [(16, 384), (256, 384)]
    sizes = torch.bincount(result.node_ids[:, 1], minlength=256)
    assert int(sizes.min()) > 0
    assert int(sizes.max()) <= 1.5 * 10_000 / 256 + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"branching": 1, "levels": 1}, "branching >= 2"),
        ({"branching": 4, "levels": 0}, "levels >= 1"),
        ({"branching": 4, "levels": 1, "balance": 0.9}, "balance must be at least 1.0"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hierarchical_kmeans(torch.randn(8, 3), **kwargs)  # type: ignore[arg-type]
