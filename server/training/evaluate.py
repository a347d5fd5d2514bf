"""Long-tail accuracy of a bank, by frequency bucket, with the routed memory and without.

The paper's probe: prompt with a fact's query ("The atomic number of Iron is"), decode greedily,
and count the fact known when the continuation starts with the answer (" 26"). Each fact is asked
in three modes: "memory" (the blocks of the query's routed cluster path, as the server fetches
them), "generic" (the context-free generic memory of every level) and "anchor" (no memory at
all), and accuracy is reported per mode, family and frequency bucket (`server.training.synth`): the
gap between "memory" and "anchor" on the rare buckets is the effect the memories exist for.

Queries are decoded in batches (right-padded prompts, a KV cache, each sequence with its own
blocks), and the blocks of a path are read once however many queries share them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from server.bank.reader import Bank
from server.model.anchor import Anchor, KVCache
from server.model.checkpoint import load_anchor
from server.model.memory import MemoryBlock
from server.model.memory_batch import build_memory_batch
from server.routing.tree import Router
from server.tokenizer import AnchorTokenizer
from server.training.facts import Fact, load_facts
from server.training.synth import N_BUCKETS
from tiers.keys import BlockKey

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


# -- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """One fact asked in one mode."""

    fact: Fact
    mode: str
    continuation: str
    correct: bool
    path: tuple[int, ...] | None = None  # node id per memory level ("memory" mode only)


@dataclass(frozen=True, slots=True)
class Tally:
    correct: int
    total: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def cell(self) -> str:
        acc = self.accuracy
        return "-" if acc is None else f"{100 * acc:.1f}% ({self.correct}/{self.total})"


@dataclass(frozen=True)
class EvalReport:
    """Every prediction, and accuracy by mode x family x bucket drawn from them."""

    bank: str
    modes: tuple[str, ...]
    predictions: list[Prediction]

    @property
    def families(self) -> list[str]:
        """Families in the order the facts list them."""
        return list(dict.fromkeys(p.fact.family for p in self.predictions))

    def tally(self, mode: str, *, family: str | None = None, bucket: int | None = None) -> Tally:
        """Correct and total facts of `mode`, within one family and bucket, or pooled (None)."""
        hits = [
            p.correct
            for p in self.predictions
            if p.mode == mode
            and (family is None or p.fact.family == family)
            and (bucket is None or p.fact.bucket == bucket)
        ]
        return Tally(correct=sum(hits), total=len(hits))

    def _facts(self, family: str | None, bucket: int | None) -> list[Fact]:
        mode = self.modes[0]
        return [
            p.fact
            for p in self.predictions
            if p.mode == mode
            and (family is None or p.fact.family == family)
            and (bucket is None or p.fact.bucket == bucket)
        ]

    def _section(self, title: str, family: str | None) -> list[str]:
        n = len(self._facts(family, None))
        lines = [
            f"### {title} ({n} facts)",
            "",
            "| bucket | mentions | " + " | ".join(self.modes) + " |",
            "| --- | --- | " + " | ".join("---" for _ in self.modes) + " |",
        ]
        for bucket in [*range(N_BUCKETS), None]:
            mentions = [f.mentions for f in self._facts(family, bucket)]
            span = "" if not mentions else f"{max(mentions)}-{min(mentions)}"
            if mentions and max(mentions) == min(mentions):
                span = str(mentions[0])
            cells = [self.tally(m, family=family, bucket=bucket).cell() for m in self.modes]
            label = "all" if bucket is None else str(bucket)
            lines.append(f"| {label} | {span} | " + " | ".join(cells) + " |")
        return lines

    def table(self) -> str:
        """Markdown: accuracy per bucket (0 = most frequent) and mode, elements first, then all."""
        lines: list[str] = []
        if "element" in self.families:
            lines += [*self._section("element", "element"), ""]
        lines += self._section("all families", None)
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        """Accuracy as `[mode][family or "all"][bucket or "all"]`, and every prediction."""
        accuracy: dict[str, Any] = {}
        for mode in self.modes:
            per_family: dict[str, Any] = {}
            for family in [*self.families, None]:
                per_bucket: dict[str, Any] = {}
                for bucket in [*range(N_BUCKETS), None]:
                    t = self.tally(mode, family=family, bucket=bucket)
                    per_bucket["all" if bucket is None else str(bucket)] = {
                        "correct": t.correct,
                        "total": t.total,
                        "accuracy": t.accuracy,
                    }
                per_family["all" if family is None else family] = per_bucket
            accuracy[mode] = per_family
        return {
            "bank": self.bank,
            "modes": list(self.modes),
            "n_facts": len(self._facts(None, None)),
            "accuracy": accuracy,
            "predictions": [
                {
                    "entity": p.fact.entity,
                    "family": p.fact.family,
                    "bucket": p.fact.bucket,
                    "mentions": p.fact.mentions,
                    "mode": p.mode,
                    "answer": p.fact.answer,
                    "continuation": p.continuation,
                    "correct": p.correct,
                    "path": None if p.path is None else list(p.path),
                }
                for p in self.predictions
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n"


# -- evaluation -----------------------------------------------------------------------------------


class _Memories:
    """The blocks each mode gives a query; a bank's blocks are read once and kept."""

    def __init__(self, bank: Bank, queries: Sequence[str], modes: Sequence[str]) -> None:
        self.bank = bank
        self.levels = bank.manifest.memory_levels()
        self._blocks: dict[int, dict[int, MemoryBlock]] = {level: {} for level in self.levels}
        self.paths: list[tuple[int, ...]] = []
        if "memory" in modes and self.levels:
            m = bank.manifest
            router = Router.load(
                bank.path / ROUTER_FILE, m.embedder, branching=m.branching, levels=m.levels
            )
            node_ids = router.route_texts(list(queries)).node_ids  # [N, levels]
            self.paths = [
                tuple(int(row[level - 1]) for level in self.levels) for row in node_ids.tolist()
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
        if path is None:
            return []
        return [self._block(level, node) for level, node in zip(self.levels, path, strict=True)]


def evaluate(
    bank_dir: str | Path,
    facts: Sequence[Fact] | str | Path,
    *,
    modes: Sequence[str] = MODES,
    max_new_tokens: int | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> EvalReport:
    """Ask every fact's query in each mode and score the greedy continuation.

    `facts`: `Fact`s or the path of a `facts.jsonl`. Each fact is decoded for its answer's
    token count plus one (so " 262" is not mistaken for " 26"), or `max_new_tokens` when given.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct names from {list(MODES)}, got {list(modes)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fact_list = load_facts(facts) if isinstance(facts, str | Path) else list(facts)
    bank = Bank.open(bank_dir)
    model = load_anchor(bank.anchor_dir, device=device)
    tokenizer = AnchorTokenizer.from_dir(bank.anchor_dir, model.config)
    memories = _Memories(bank, [f.query for f in fact_list], modes)
    prompts = [tokenizer.encode(f.query) for f in fact_list]
    budgets = [max_new_tokens or answer_tokens(tokenizer, f.query, f.answer) + 1 for f in fact_list]
    starts = range(0, len(fact_list), batch_size)
    predictions: list[Prediction] = []
    with tqdm(
        total=len(modes) * len(starts), desc="evaluate", unit="batch", disable=not progress
    ) as bar:
        for mode in modes:
            for start in starts:
                idx = range(start, min(start + batch_size, len(fact_list)))
                outputs = greedy_decode(
                    model,
                    [prompts[i] for i in idx],
                    max_new_tokens=max(budgets[i] for i in idx),
                    memory=[memories.blocks(mode, i) for i in idx],
                    eos_ids=tokenizer.eos_ids,
                )
                for i, ids in zip(idx, outputs, strict=True):
                    fact = fact_list[i]
                    # Greedy decoding is per sequence: stopping at a fact's own budget equals
                    # cutting the batch's longer continuation there.
                    text = tokenizer.decode(ids[: budgets[i]])
                    predictions.append(
                        Prediction(
                            fact=fact,
                            mode=mode,
                            continuation=text,
                            correct=score(text, fact.answer),
                            path=memories.path(i) if mode == "memory" else None,
                        )
                    )
                bar.update(1)
    return EvalReport(bank=str(bank.path), modes=tuple(modes), predictions=predictions)
