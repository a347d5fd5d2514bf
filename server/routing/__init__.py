"""Routing a prompt to its cluster path: embedders, the centroid tree, hierarchical k-means.

A prompt is embedded (all-MiniLM-L6-v2 as in the paper, or hashed TF-IDF for tests and tiny
banks), then walked greedily down a tree of nested cluster centroids; the chosen child at each
level is its cluster path, whose memory blocks the engine fetches.
"""

from server.routing.embedders import (
    EMBEDDERS,
    Embedder,
    HashedTfidfEmbedder,
    load_embedder,
    make_embedder,
)
from server.routing.errors import (
    CentroidTreeError,
    EmbedderFilesMissingError,
    EmbedderMismatchError,
    RouterError,
    RouterFileError,
    RouterFileNotFoundError,
)
from server.routing.kmeans import (
    HierarchicalClustering,
    cluster_hierarchically,
    hierarchical_kmeans,
)
from server.routing.minilm import MINILM_DIM, MINILM_NAME, MiniLMEmbedder
from server.routing.tree import CentroidTree, Router, RouteResult

__all__ = [
    "EMBEDDERS",
    "MINILM_DIM",
    "MINILM_NAME",
    "CentroidTree",
    "CentroidTreeError",
    "Embedder",
    "EmbedderFilesMissingError",
    "EmbedderMismatchError",
    "HashedTfidfEmbedder",
    "HierarchicalClustering",
    "MiniLMEmbedder",
    "RouteResult",
    "Router",
    "RouterError",
    "RouterFileError",
    "RouterFileNotFoundError",
    "cluster_hierarchically",
    "hierarchical_kmeans",
    "load_embedder",
    "make_embedder",
]
