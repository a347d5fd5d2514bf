"""The centroid tree's greedy routing, its tensors, and the Router's router.safetensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from server.bank import Bank
from server.bank.router_file import ROUTER_NAME
from server.defaults import DEMO_BANK
from server.routing import (
    CentroidTree,
    CentroidTreeError,
    EmbedderMismatchError,
    HashedTfidfEmbedder,
    Router,
    RouterFileError,
    RouterFileNotFoundError,
    hierarchical_kmeans,
)


def _random_tree(
    *, branching: int = 4, levels: int = 3, dim: int = 8, seed: int = 0
) -> CentroidTree:
    g = torch.Generator().manual_seed(seed)
    return CentroidTree(
        [torch.randn(branching**level, dim, generator=g) for level in range(1, levels + 1)],
        branching=branching,
    )


def _brute_force_path(
    tree: CentroidTree, x: list[float]
) -> tuple[list[int], list[int], list[float]]:
    """One sample, plain Python: nearest child at each level, lowest index on ties."""
    nodes, choices, dists = [], [], []
    node = 0
    for level in range(tree.levels):
        best, best_d = -1, math.inf
        for j in range(tree.branching):
            c = tree.centroids[level][node * tree.branching + j].tolist()
            d = math.dist(c, x)
            if d < best_d:
                best, best_d = j, d
        node = node * tree.branching + best
        nodes.append(node)
        choices.append(best)
        dists.append(best_d)
    return nodes, choices, dists


def test_route_matches_brute_force() -> None:
    tree = _random_tree(branching=4, levels=3, dim=8)
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    result = tree.route(x)
    assert result.node_ids.shape == result.child_index.shape == result.distances.shape == (200, 3)
    for i in range(200):
        nodes, choices, dists = _brute_force_path(tree, x[i].tolist())
        assert result.node_ids[i].tolist() == nodes
        assert result.child_index[i].tolist() == choices
        assert result.distances[i].tolist() == pytest.approx(dists, abs=1e-5)
        assert result.path(i) == tuple(choices)
        one = tree.route(x[i : i + 1])  # the single-input path (a serving request)
        assert one.node_ids[0].tolist() == nodes
        assert one.child_index[0].tolist() == choices
        assert one.distances[0].tolist() == pytest.approx(dists, abs=1e-5)


def test_route_is_deterministic_and_row_independent() -> None:
    tree = _random_tree()
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    a, b = tree.route(x), tree.route(x)
    assert torch.equal(a.node_ids, b.node_ids)
    assert torch.equal(a.distances, b.distances)
    one = tree.route(x[17:18])
    assert torch.equal(one.node_ids[0], a.node_ids[17])


def test_route_fewer_levels_is_a_prefix() -> None:
    tree = _random_tree()
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(3))
    full, two = tree.route(x), tree.route(x, levels=2)
    assert torch.equal(two.node_ids, full.node_ids[:, :2])
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"levels must be in 1\.\.3"):
            tree.route(x, levels=bad)


def test_ties_go_to_the_lowest_index() -> None:
    same = torch.ones(1, 3)
    tree = CentroidTree([same.repeat(2, 1), same.repeat(4, 1)], branching=2)
    assert tree.route(torch.zeros(5, 3)).child_index.tolist() == [[0, 0]] * 5
    # Equidistant but different centroids, either order: still the lowest index.
    for level1 in ([[1.0, 0.0], [-1.0, 0.0]], [[-1.0, 0.0], [1.0, 0.0]]):
        level2 = [[0.0, 1.0], [0.0, -1.0], [0.0, -2.0], [0.0, 2.0]]
        tree = CentroidTree([torch.tensor(level1), torch.tensor(level2)], branching=2)
        result = tree.route(torch.zeros(1, 2))
        assert result.node_ids.tolist() == [[0, 0]]


def test_distances_are_to_the_chosen_centroids() -> None:
    tree = _random_tree()
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(4))
    result = tree.route(x)
    for level in range(3):
        chosen = tree.centroids[level][result.node_ids[:, level]]
        expected = torch.linalg.vector_norm(x - chosen, dim=1)
        assert torch.allclose(result.distances[:, level], expected, atol=1e-5)
        if level:
            parent = result.node_ids[:, level - 1] * 4 + result.child_index[:, level]
            assert torch.equal(result.node_ids[:, level], parent)


def test_wrong_embedding_dim_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expected \[N, 8\]"):
        _random_tree().route(torch.zeros(2, 9))


def test_tensors_round_trip() -> None:
    tree = _random_tree()
    tensors = tree.to_tensors()
    assert list(tensors) == ["centroids.L1", "centroids.L2", "centroids.L3"]
    again = CentroidTree.from_tensors(tensors, branching=4)
    x = torch.randn(20, 8)
    assert torch.equal(again.route(x).node_ids, tree.route(x).node_ids)
    for a, b in zip(again.centroids, tree.centroids, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"centroids.L1": torch.zeros(4, 8), "centroids.L2": torch.zeros(15, 8)},
            r"centroids\.L2 has shape \(15, 8\), expected \(16, 8\)",
        ),
        (
            {"centroids.L1": torch.zeros(4, 8), "centroids.L2": torch.zeros(16, 7)},
            r"centroids\.L2 has shape \(16, 7\)",
        ),
        (
            {"centroids.L1": torch.zeros(4, 8), "centroids.L3": torch.zeros(64, 8)},
            r"centroids\.L2 is missing",
        ),
        (
            {"centroids.L1": torch.zeros(4, 8, dtype=torch.long)},
            r"centroids\.L1 has dtype torch\.int64",
        ),
        ({"centroids.L1": torch.full((4, 8), math.nan)}, r"centroids\.L1 holds NaN"),
        (
            {"centroids.L1": torch.zeros(4, 8), "centroid.L2": torch.zeros(16, 8)},
            r"unexpected tensor 'centroid\.L2'",
        ),
        ({}, "no centroid tensors"),
    ],
)
def test_bad_tensors_are_refused_by_name(tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(CentroidTreeError, match=message):
        CentroidTree.from_tensors(tensors, branching=4)


CORPUS = [
    f"{name} fact {k}: the atomic number of {name} is {z}."
    for name, z in [
        ("iron", 26),
        ("gold", 79),
        ("neon", 10),
        ("tin", 50),
        ("zinc", 30),
        ("argon", 18),
    ]
    for k in range(3)
] + [f"a story about {animal} number {k}" for animal in ("cats", "dogs", "owls") for k in range(4)]


@pytest.fixture
def router() -> Router:
    emb = HashedTfidfEmbedder(dim=2048, seed=5).fit(CORPUS)
    return Router(emb, hierarchical_kmeans(emb.embed(CORPUS), branching=3, levels=2))


def test_router_saves_and_loads(router: Router, tmp_path: Path) -> None:
    path = tmp_path / "router.safetensors"
    router.save(path)
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == ["centroids.L1", "centroids.L2", "embedder.idf"]
    again = Router.load(path, router.embedder.spec, branching=3, levels=2)
    queries = ["atomic number of gold", "cats and owls", ""]
    assert torch.equal(again.route_texts(queries).node_ids, router.route_texts(queries).node_ids)
    assert [p.name for p in tmp_path.iterdir()] == ["router.safetensors"]  # no temp file left


def test_router_routes_a_query_like_its_documents(router: Router) -> None:
    docs = router.route_texts([d for d in CORPUS if d.startswith("gold")])
    query = router.route_texts(["What is the atomic number of gold?"])
    assert query.node_ids[0, 0] in docs.node_ids[:, 0].tolist()


def test_router_load_refuses_mismatches(router: Router, tmp_path: Path) -> None:
    path = tmp_path / "router.safetensors"
    router.save(path)
    spec = router.embedder.spec
    with pytest.raises(CentroidTreeError, match="holds 2 levels of centroids, the manifest says 3"):
        Router.load(path, spec, branching=3, levels=3)
    with pytest.raises(CentroidTreeError, match=r"centroids\.L1 has shape \(3, 2048\)"):
        Router.load(path, spec, branching=2, levels=2)
    with pytest.raises(EmbedderMismatchError, match="dim=4096"):
        Router.load(path, {**spec, "dim": 4096}, branching=3, levels=2)
    with pytest.raises(RouterFileNotFoundError, match="does not exist"):
        Router.load(tmp_path / "nope.safetensors", spec, branching=3, levels=2)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(RouterFileError, match="cannot read"):
        Router.load(garbage, spec, branching=3, levels=2)
    stray = tmp_path / "stray.safetensors"
    save_file(
        {
            **router.tree.to_tensors(),
            "embedder.idf": router.embedder.state_tensors()["idf"],
            "embedder.x": torch.ones(1),
        },
        stray,
    )
    with pytest.raises(EmbedderMismatchError, match=r"unexpected tensors \['x'\]"):
        Router.load(stray, spec, branching=3, levels=2)


def test_router_refuses_an_embedder_of_another_dim(router: Router) -> None:
    with pytest.raises(CentroidTreeError, match="2048-d"):
        Router(HashedTfidfEmbedder(dim=64), router.tree)


def test_a_single_prompt_routes_sparsely_to_the_same_path_as_the_dense_batch() -> None:
    """The demo bank's router: hashed TF-IDF prompts take the sparse path one at a time."""
    m = Bank.open(DEMO_BANK).manifest
    router = Router.load(
        DEMO_BANK / ROUTER_NAME, m.embedder, branching=m.branching, levels=m.levels
    )
    assert isinstance(router.embedder, HashedTfidfEmbedder)
    texts = [
        *(f"The atomic number of {name} is" for name in ("Iron", "Thulium", "Gold", "Xenon")),
        "Chop the pumpkin and fry it gently in butter.",
        "The capital of Buvithil is",
        "",
        "!!!",
        "the the the the",
    ]
    dense = router.tree.route(router.embedder.embed(texts))
    for i, text in enumerate(texts):
        buckets, values = router.embedder.sparse_terms(text)
        row = torch.zeros(router.embedder.dim).index_put_(
            (torch.tensor(buckets),), torch.tensor(values)
        )
        assert torch.allclose(row, router.embedder.embed([text])[0], atol=1e-6)
        one = router.route_texts([text])
        assert one.node_ids[0].tolist() == dense.node_ids[i].tolist(), text
        assert one.distances[0].tolist() == pytest.approx(dense.distances[i].tolist(), abs=1e-4)
        nodes, choices, dists = router.route_one(text)  # what a serving request calls
        assert nodes == dense.node_ids[i].tolist()
        assert choices == dense.child_index[i].tolist()
        assert dists == pytest.approx(dense.distances[i].tolist(), abs=1e-4)
