"""Routing accuracy of an embedder: how many facts' queries reach a cluster that holds the fact,
asked in the corpus's own words and in words no document uses (`bench.fidelity.wording`).

Measured without training, as `hmem build` clusters: the corpus cut into the build's windows,
embedded and clustered (`cluster_hierarchically`, the build's branching, levels and seed), the
facts restated as the build restates them (`restate.mine`), and every window and restated
sentence routed greedily: the leaf it trains. A fact is *held* by the leaves of the texts that
state it (its entity's name and its answer, each as whole words); its query is routed right when
its leaf is one of them (and at level 1 when its level-1 node is one of theirs). A built bank's
router gives the same leaves (`bank_routing`), so this is the routing its memories see.

Embedding time is measured over the windows and the restated sentences, clustering time beside
it: what the embedder adds to a build.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.fidelity.wording import disjoint_queries
from server.bank.reader import Bank
from server.routing import CentroidTree, Embedder, cluster_hierarchically, make_embedder
from server.training.corpus import load_corpus, split_windows
from server.training.evaluate import load_router
from server.training.facts import Fact
from server.training.pipeline import BuildSettings
from server.training.queries import load_queries
from server.training.report import Tally
from server.training.restate import mine

CHUNK = 256  # texts embedded at once, as the build embeds them


def build_texts(settings: BuildSettings) -> tuple[list[str], list[str]]:
    """The build's windows of the corpus and the restated sentences it adds (none when the build
    does not restate), as `build_bank` makes them."""
    docs = load_corpus(settings.corpus)
    windows = [w for d in docs for w in split_windows(d.text, max(16, settings.seq_len - 2))]
    restated = mine(windows).sentences if settings.restate else []
    return windows, restated


def embed(embedder: Embedder, texts: Sequence[str]) -> Tensor:
    """[N, dim]: `texts` embedded `CHUNK` at a time."""
    if not texts:
        return torch.empty(0, embedder.dim)
    return torch.cat([embedder.embed(texts[i : i + CHUNK]) for i in range(0, len(texts), CHUNK)])


def _whole(text: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(text.strip().lower()) + r"(?!\w)")


def holders(facts: Sequence[Fact], texts: Sequence[str]) -> list[list[int]]:
    """Per fact, the indices of `texts` that state it: its entity and its answer, whole words."""
    lowered = [t.lower() for t in texts]
    out = []
    for fact in facts:
        name, answer = _whole(fact.entity), _whole(fact.answer)
        out.append([i for i, t in enumerate(lowered) if name.search(t) and answer.search(t)])
    return out


def routed_right(
    tree: CentroidTree, embedder: Embedder, queries: Sequence[str], held: Sequence[set[int]]
) -> tuple[list[bool], list[bool]]:
    """Per query, whether its leaf holds its fact, and whether its level-1 node does; `held` is
    each fact's set of leaves (node ids at the last level)."""
    nodes = tree.route(embed(embedder, queries)).node_ids.tolist()  # [N, levels]
    b_below = tree.branching ** (tree.levels - 1)  # leaves under one level-1 node
    leaf = [path[-1] in h for path, h in zip(nodes, held, strict=True)]
    level1 = [path[0] in {n // b_below for n in h} for path, h in zip(nodes, held, strict=True)]
    return leaf, level1


def tallies(facts: Sequence[Fact], right: Sequence[bool], rare: tuple[int, ...]) -> dict[str, Any]:
    """Accuracy cells by bucket, all facts, the rarest bucket and the rare ones pooled."""

    def tally(keep: Sequence[bool]) -> dict[str, Any]:
        kept = [r for r, k in zip(right, keep, strict=True) if k]
        return Tally(sum(kept), len(kept)).as_dict()

    buckets = sorted({f.bucket for f in facts})
    return {
        "buckets": {str(b): tally([f.bucket == b for f in facts]) for b in buckets},
        "all": tally([True] * len(facts)),
        "rarest": tally([f.bucket == rare[-1] for f in facts]),
        "rare": tally([f.bucket in rare for f in facts]),
    }


@dataclass(frozen=True)
class RoutingTask:
    """Routing of one embedder on one clustering seed of the build `settings` describes."""

    embedder: str
    seed: int
    settings: BuildSettings
    facts: Path  # facts.jsonl or a plain query file
    rare: tuple[int, ...]  # the rarest buckets, rarest last


def run_routing(task: RoutingTask) -> dict[str, Any]:
    """Cluster as the build does with `task.embedder` and seed `task.seed`; route the facts'
    own queries and their wording-disjoint ones. Accuracy cells per kind of query and level,
    and the seconds the embedder and the clustering took."""
    s = task.settings
    windows, restated = build_texts(s)
    facts = load_queries(task.facts)
    reworded = disjoint_queries(facts, [d.text for d in load_corpus(s.corpus)])
    started = time.perf_counter()
    embedder = make_embedder(
        task.embedder, windows, dim=s.embed_dim, seed=task.seed, minilm_dir=s.minilm_dir
    )
    x = embed(embedder, windows)
    x_restated = embed(embedder, restated)
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    tree = cluster_hierarchically(x, branching=s.branching, levels=s.levels, seed=task.seed).tree
    cluster_s = time.perf_counter() - started
    leaves = tree.route(torch.cat([x, x_restated])).node_ids[:, -1].tolist()
    held = [{leaves[i] for i in h} for h in holders(reworded.originals, windows + restated)]
    out: dict[str, Any] = {
        "embedder": task.embedder,
        "seed": task.seed,
        "embed_s": embed_s,
        "cluster_s": cluster_s,
        "texts": len(windows) + len(restated),
        "unheld": sum(not h for h in held),
        "asked": len(reworded.facts),
        "unasked": reworded.unasked,
        "templates": reworded.templates,
    }
    for kind, asked in (("own", reworded.originals), ("disjoint", reworded.facts)):
        leaf, level1 = routed_right(tree, embedder, [f.query for f in asked], held)
        out[kind] = {
            "leaf": tallies(asked, leaf, task.rare),
            "level1": tallies(asked, level1, task.rare),
        }
    return out


def bank_routing(
    bank: Path, settings: BuildSettings, facts: Sequence[Fact], rare: tuple[int, ...]
) -> dict[str, Any]:
    """Routing accuracy cells of `facts`' queries on a built bank (`settings`: its build): the
    leaves holding each fact are those its stating windows and restated sentences reach by the
    bank's own router, the leaf of its query is where the server sends it."""
    router = load_router(Bank.open(bank))
    windows, restated = build_texts(settings)
    texts = windows + restated
    leaves = router.tree.route(embed(router.embedder, texts)).node_ids[:, -1].tolist()
    held = [{leaves[i] for i in h} for h in holders(facts, texts)]
    routed = router.route_texts([f.query for f in facts]).node_ids[:, -1].tolist()
    right = [leaf in h for leaf, h in zip(routed, held, strict=True)]
    return tallies(facts, right, rare)
