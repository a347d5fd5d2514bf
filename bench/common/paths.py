"""Paths through a bank's tree of clusters, as the benches pick them: a leaf's path of child
indexes, and the block of every level along a path."""

from __future__ import annotations

from server.routing.tree import node_ids
from tiers.keys import BlockKey


def leaf_path(leaf: int, levels: int, branching: int) -> list[int]:
    """Child indexes (i1, ..., iL) of leaf number `leaf`: its last `levels` digits in base
    `branching`, level 1 first."""
    return [(leaf // branching ** (levels - level)) % branching for level in range(1, levels + 1)]


def path_keys(bank_id: str, path: list[int], branching: int) -> list[BlockKey]:
    """The block of every level on a path of child indexes."""
    nodes = node_ids(path, branching)
    return [BlockKey(bank_id, level, node) for level, node in enumerate(nodes, start=1)]
