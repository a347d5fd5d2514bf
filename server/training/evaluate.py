"""Long-tail accuracy of a bank, by frequency bucket, with the routed memory and without.

The paper's probe: prompt with a fact's query ("The atomic number of Iron is"), decode greedily,
and count the fact known when the continuation starts with the answer (" 26"). Each fact is asked
in three modes: "memory" (the blocks of the query's routed cluster path, as the server fetches
them), "generic" (the context-free generic memory of every level) and "anchor" (no memory at
all), and accuracy is reported per mode, family and frequency bucket (`server.training.synth`): the
gap between "memory" and "anchor" on the rare buckets is the effect the memories exist for.
The facts come from `hmem synth`'s `facts.jsonl` or from a plain query file of prompts and
answers (`server.training.queries`).

Blocking (the paper's fidelity test, which keeps "the best-matching 1/16 of the bank" from a
query): `evaluate(..., blocked=...)` routes a fact in "memory" mode through the nearest level-1
subtree not blocked for it; `level1_ranking` says which subtrees are nearest.

Queries are decoded in batches (right-padded prompts, a KV cache, each sequence with its own
blocks), and the blocks of a path are read once however many queries share them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from server.bank.reader import Bank
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor
from server.model.kv_cache import KVCache
from server.model.memory import MemoryBlock
from server.model.memory_batch import build_memory_batch
from server.routing.tree import Router
from server.tokenizer import AnchorTokenizer
from server.training.facts import Fact
from server.training.queries import load_queries
from server.training.report import EvalReport, Prediction, Tally
from tiers.keys import BlockKey

__all__ = [
    "MODES",
    "EvalReport",
    "Prediction",
    "Tally",
    "answer_tokens",
    "evaluate",
    "greedy_decode",
    "level1_ranking",
    "load_router",
    "route_around",
    "score",
]

MODES = ("memory", "anchor", "generic")
ROUTER_FILE = "router.safetensors"


def score(continuation: str, answer: str) -> bool:
    """Whether `continuation` gives `answer`: it starts with it and the answer's word ends there.

    " 26" is right for " 26." and " 26 and", wrong for " 262" and " 2".
    """
    if not continuation.startswith(answer):
        return False
    rest = continuation[len(answer) :]
    return not rest or not rest[0].isalnum()


def answer_tokens(tokenizer: AnchorTokenizer, query: str, answer: str) -> int:
    """Tokens the answer takes after its query (or alone, where a merge spans the boundary)."""
    after_query = len(tokenizer.encode(query + answer, add_bos=False)) - len(
        tokenizer.encode(query, add_bos=False)
    )
    return max(after_query, len(tokenizer.encode(answer, add_bos=False)), 1)


@torch.inference_mode()
def greedy_decode(
    model: Anchor,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    memory: Sequence[Sequence[MemoryBlock]] | None = None,
    eos_ids: Collection[int] = (),
) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, each with its own memory blocks.

    Prompts are right-padded and prefilled at once into a KV cache; each step then feeds every
    sequence its last token at its own next position. A sequence stops at an EOS id (not
    returned); the others go on to `max_new_tokens`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if memory is not None and len(memory) != len(prompts):
        raise ValueError(f"{len(memory)} memory lists for {len(prompts)} prompts")
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    B, T = len(prompts), max(len(p) for p in prompts)
    if T + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompts of {T} tokens plus {max_new_tokens} new ones exceed the model's context "
            f"length {model.config.max_seq_len}"
        )
    # Right-padded with id 0 (any valid id: a pad's output is never read).
    tokens = torch.tensor([[*p, *[0] * (T - len(p))] for p in prompts], device=device)  # [B, T]
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    mem = None if memory is None else build_memory_batch(memory, dtype=dtype, device=device)
    cache = KVCache(
        model.config, batch_size=B, max_len=T + max_new_tokens, dtype=dtype, device=device
    )
    rows = torch.arange(B, device=device)
    positions = torch.arange(T, device=device).expand(B, T)  # [B, T]
    logits = model(tokens, positions=positions, cache=cache, memory=mem)  # [B, T, vocab]
    # A pad's cache entry lies past its sequence's last position, so it stays masked out until
    # that sequence's next token is written over it.
    next_ids = logits[rows, lengths - 1].argmax(dim=-1)  # [B]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    finished = torch.isin(next_ids, eos)  # [B]
    generated = [next_ids]
    for step in range(1, max_new_tokens):
        if bool(finished.all()):
            break
        positions = (lengths + step - 1)[:, None]  # [B, 1]: where next_ids go
        logits = model(next_ids[:, None], positions=positions, cache=cache, memory=mem)
        next_ids = logits[:, 0].argmax(dim=-1)  # [B]
        finished |= torch.isin(next_ids, eos)
        generated.append(next_ids)
    out = torch.stack(generated, dim=1).tolist()  # [B, new]
    results = []
    for ids in out:
        cut = next((j for j, t in enumerate(ids) if t in eos_ids), len(ids))
        results.append([int(t) for t in ids[:cut]])
    return results


# -- routing, and routing around blocked subtrees ------------------------------------------------


def load_router(bank: Bank) -> Router:
    """The bank's router, as the server loads it."""
    m = bank.manifest
    return Router.load(bank.path / ROUTER_FILE, m.embedder, branching=m.branching, levels=m.levels)


def level1_ranking(bank: Bank | str | Path, queries: Sequence[str]) -> torch.Tensor:
    """Level-1 node ids of each query [N, branching], best-matching (nearest centroid) first.

    The bank's embedder and the distances routing compares (`CentroidTree.level1_ranking`):
    column 0 is the subtree a query is routed to (up to float rounding for a lone query, which
    the router routes from its sparse terms).
    """
    router = load_router(bank if isinstance(bank, Bank) else Bank.open(bank))
    if not queries:
        return torch.empty(0, router.tree.branching, dtype=torch.long)
    return router.tree.level1_ranking(router.embedder.embed(list(queries)))


def route_around(
    router: Router, queries: Sequence[str], blocked: Sequence[Collection[int]]
) -> list[tuple[int, ...] | None]:
    """Each query's node ids, one per level: what `router` routes it to when `blocked[i]` is
    empty; else greedy through the nearest level-1 subtree not in `blocked[i]`, then below it as
    routing goes; None when every level-1 subtree is blocked."""
    b = router.tree.branching
    if len(blocked) != len(queries):
        raise ValueError(f"{len(blocked)} blocked sets for {len(queries)} queries")
    for i, nodes in enumerate(blocked):
        if any(not 0 <= n < b for n in nodes):
            raise ValueError(f"blocked[{i}] = {sorted(nodes)}: level-1 node ids are 0..{b - 1}")
    paths: list[tuple[int, ...] | None] = [
        tuple(row) for row in router.route_texts(list(queries)).node_ids.tolist()
    ]
    rerouted = [i for i, nodes in enumerate(blocked) if nodes]
    if not rerouted:
        return paths
    embeddings = router.embedder.embed([queries[i] for i in rerouted])
    ranking = router.tree.level1_ranking(embeddings).tolist()
    first = [
        next((n for n in row if n not in blocked[i]), None)
        for i, row in zip(rerouted, ranking, strict=True)
    ]
    rows = [j for j, node in enumerate(first) if node is not None]
    for i in rerouted:
        paths[i] = None
    if rows:
        start = torch.tensor([first[j] for j in rows], dtype=torch.long)
        routes = router.tree.route_under(embeddings[rows], start).node_ids.tolist()
        for j, route in zip(rows, routes, strict=True):
            paths[rerouted[j]] = tuple(route)
    return paths


# -- evaluation -----------------------------------------------------------------------------------


class _Memories:
    """The blocks each mode gives a query; a bank's blocks are read once and kept."""

    def __init__(
        self,
        bank: Bank,
        queries: Sequence[str],
        modes: Sequence[str],
        blocked: Sequence[Collection[int]] | None = None,
    ) -> None:
        self.bank = bank
        self.levels = bank.manifest.memory_levels()
        self._blocks: dict[int, dict[int, MemoryBlock]] = {level: {} for level in self.levels}
        # The node of each memory level, per query; () for a query with every subtree blocked.
        self.paths: list[tuple[int, ...]] = []
        if "memory" in modes and self.levels:
            routes = route_around(load_router(bank), queries, blocked or [()] * len(queries))
            self.paths = [
                () if route is None else tuple(route[level - 1] for level in self.levels)
                for route in routes
            ]
        self.generic: list[MemoryBlock] = []
        if "generic" in modes:
            found = [bank.generic(level) for level in self.levels]
            self.generic = [b for b in found if b is not None]
            if not self.generic:
                raise ValueError(
                    f"bank {str(bank.path)!r} has no generic memory; leave 'generic' out of modes"
                )

    def _block(self, level: int, node: int) -> MemoryBlock:
        cached = self._blocks[level].get(node)
        if cached is None:
            key = BlockKey(self.bank.manifest.bank_id, level, node)
            cached = self._blocks[level][node] = self.bank.read_block(key)
        return cached

    def path(self, i: int) -> tuple[int, ...] | None:
        return self.paths[i] if self.paths else None

    def blocks(self, mode: str, i: int) -> list[MemoryBlock]:
        if mode == "anchor":
            return []
        if mode == "generic":
            return self.generic
        path = self.path(i)
        if not path:  # no memory levels, or every subtree blocked
            return []
        return [self._block(level, node) for level, node in zip(self.levels, path, strict=True)]


def ask_facts(
    model: Anchor,
    tokenizer: AnchorTokenizer,
    facts: Sequence[Fact],
    *,
    modes: Sequence[str],
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    blocks: Callable[[str, int], list[MemoryBlock]],
    path: Callable[[int], tuple[int, ...] | None],
    batch_size: int,
    on_batch: Callable[[], object] = lambda: None,
) -> tuple[list[Prediction], dict[str, list[list[int]]]]:
    """Each fact's prompt decoded greedily in each mode for its budget of tokens, `batch_size`
    at a time, with `blocks(mode, i)` as fact i's memory, and scored. Returns the predictions
    and, per mode, each fact's continuation token ids."""
    predictions: list[Prediction] = []
    ids: dict[str, list[list[int]]] = {}
    for mode in modes:
        ids[mode] = []
        for start in range(0, len(facts), batch_size):
            idx = range(start, min(start + batch_size, len(facts)))
            outputs = greedy_decode(
                model,
                [prompts[i] for i in idx],
                max_new_tokens=max(budgets[i] for i in idx),
                memory=[blocks(mode, i) for i in idx],
                eos_ids=tokenizer.eos_ids,
            )
            for i, out in zip(idx, outputs, strict=True):
                fact = facts[i]
                # Greedy decoding is per sequence: stopping at a fact's own budget equals
                # cutting the batch's longer continuation there.
                kept = out[: budgets[i]]
                text = tokenizer.decode(kept)
                ids[mode].append(kept)
                predictions.append(
                    Prediction(
                        fact=fact,
                        mode=mode,
                        continuation=text,
                        correct=score(text, fact.answer),
                        path=path(i) if mode == "memory" else None,
                    )
                )
            on_batch()
    return predictions, ids


def _prompt(tokenizer: AnchorTokenizer, query: str, *, chat: bool) -> list[int]:
    """A completion prompt's ids, or a one-turn chat's as the server builds them."""
    if not chat:
        return tokenizer.encode(query)
    rendered = tokenizer.render_chat([{"role": "user", "content": query}])
    return tokenizer.encode(rendered, add_bos=False)  # the template writes the BOS


def evaluate(
    bank_dir: str | Path,
    facts: Sequence[Fact] | str | Path,
    *,
    modes: Sequence[str] = MODES,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    blocked: Sequence[Collection[int]] | None = None,
    dtype: torch.dtype = torch.float32,
    weights: Literal["float", "int8"] = "float",
    chat: bool = False,
) -> EvalReport:
    """Ask every fact's query in each mode and score the greedy continuation.

    `facts`: `Fact`s, or the path of a `facts.jsonl` or of a plain query file (`load_queries`).
    Each fact is decoded for its answer's token count plus one (so " 262" is not mistaken for
    " 26"), or `max_new_tokens` when given.

    `blocked`: per fact, level-1 node ids kept from it in "memory" mode: a fact with some is
    routed through the nearest level-1 subtree not among them, then greedily below it
    (`route_around`), and gets no memory when all are blocked; its `Prediction.path` is the path
    used. The other modes, and facts with an empty set, are unaffected.

    `dtype` and `weights` are those of serving (`hmem serve --dtype --weights`): the anchor is
    loaded in `dtype` and, with `weights="int8"`, quantized as `--weights int8` does; an int8
    bank's memories are int8 either way.

    `chat`: each fact's query is a user's message, asked as the server asks a one-turn chat:
    rendered by the anchor's chat template with the assistant's line to answer on, and routed on
    the message alone (`server.training.chat.as_chat` makes such facts from a corpus's facts).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct names from {list(MODES)}, got {list(modes)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fact_list = load_queries(facts) if isinstance(facts, str | Path) else list(facts)
    if blocked is not None and len(blocked) != len(fact_list):
        raise ValueError(f"{len(blocked)} blocked sets for {len(fact_list)} facts")
    bank = Bank.open(bank_dir)
    model = load_anchor(bank.anchor_dir, dtype=dtype, device=device)
    if weights == "int8":
        model.quantize_int8()
    tokenizer = AnchorTokenizer.from_dir(bank.anchor_dir, model.config)
    memories = _Memories(bank, [f.query for f in fact_list], modes, blocked)
    prompts = [_prompt(tokenizer, f.query, chat=chat) for f in fact_list]
    budgets = [max_new_tokens or answer_tokens(tokenizer, f.query, f.answer) + 1 for f in fact_list]
    batches = -(-len(fact_list) // batch_size)
    with tqdm(
        total=len(modes) * batches, desc="evaluate", unit="batch", disable=not progress
    ) as bar:
        predictions, _ = ask_facts(
            model,
            tokenizer,
            fact_list,
            modes=modes,
            prompts=prompts,
            budgets=budgets,
            blocks=memories.blocks,
            path=memories.path,
            batch_size=batch_size,
            on_batch=lambda: bar.update(1),
        )
    return EvalReport(bank=str(bank.path), modes=tuple(modes), predictions=predictions)
