"""Routing agreement: how often a fact's query reaches a leaf that holds the fact's documents.

No training: the corpus is embedded and clustered as `hmem build` does it (windows, hashed
TF-IDF, balanced hierarchical k-means, greedy routes), once per embedder variant, and every
fact's query ("The atomic number of X is") is routed down the same tree. A fact counts when its
query's leaf is the leaf of at least one window that states the fact (query + answer). Memory
can only answer a rare fact its query routes to, so this bounds the long-tail accuracy.

    python -m bench.routing --corpus corpus/corpus.jsonl --facts corpus/facts.jsonl \
        --idf-power 1 2 3 4

Prints a markdown table: per variant, the rarest element bucket, all rare elements (buckets
1-4), all rare facts, and all facts.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from server.routing import HashedTfidfEmbedder, cluster_hierarchically
from server.training.corpus import load_corpus, split_windows


def agreement(
    windows: list[str],
    facts: list[dict[str, object]],
    *,
    dim: int,
    idf_power: float,
    branching: int,
    levels: int,
    seed: int,
) -> dict[tuple[str, int], list[bool]]:
    """(family, bucket) -> per fact: does its query reach a leaf holding the fact?"""
    emb = HashedTfidfEmbedder(dim=dim, seed=seed, idf_power=idf_power).fit(windows)
    x = emb.embed(windows)
    tree = cluster_hierarchically(x, branching=branching, levels=levels, seed=seed).tree
    leaves = tree.route(x).node_ids[:, -1].tolist()
    queries = tree.route(emb.embed([str(f["query"]) for f in facts])).node_ids[:, -1].tolist()
    out: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for fact, leaf in zip(facts, queries, strict=True):
        stated = f"{fact['query']}{fact['answer']}"
        homes = {leaves[i] for i, w in enumerate(windows) if stated in w}
        out[(str(fact["family"]), int(str(fact["bucket"])))].append(leaf in homes)
    return out


def _frac(values: list[bool]) -> str:
    return f"{sum(values)}/{len(values)} ({100 * sum(values) / max(1, len(values)):.0f}%)"


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.routing",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--facts", type=Path, required=True)
    p.add_argument("--idf-power", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--branching", type=int, default=8)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=128, help="the build's window length")
    args = p.parse_args()
    docs = load_corpus(args.corpus)
    windows = [w for d in docs for w in split_windows(d.text, max(16, args.seq_len - 2))]
    with args.facts.open() as f:
        facts = [json.loads(line) for line in f if line.strip()]
    rarest = max(int(f["bucket"]) for f in facts)
    print("| idf power | rarest elements | rare elements | rare facts | all facts |")
    print("| --- | --- | --- | --- | --- |")
    for power in args.idf_power:
        got = agreement(
            windows, facts, dim=args.dim, idf_power=power, branching=args.branching,
            levels=args.levels, seed=args.seed,
        )  # fmt: skip
        rare_el = [v for (fam, b), vs in got.items() if fam == "element" and b >= 1 for v in vs]
        rare = [v for (_, b), vs in got.items() if b >= 1 for v in vs]
        every = [v for vs in got.values() for v in vs]
        print(
            f"| {power:g} | {_frac(got[('element', rarest)])} | {_frac(rare_el)} | "
            f"{_frac(rare)} | {_frac(every)} |",
            flush=True,
        )
