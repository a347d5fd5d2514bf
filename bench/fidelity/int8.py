"""Table 5 of bench.fidelity: the default build served with int8 weights, against float ones.

The default build's bank is converted to int8 (`convert_bank`: FFN blocks as int8 with a float32
scale per neuron) beside it (`bank-int8`), and the facts are asked of four variants of the same
trained model, each in "memory" mode (the routed path's blocks) and "anchor" mode (none):

| variant | activations | anchor weights | memory blocks |
| --- | --- | --- | --- |
| float32 | float32 | float32, as built | the float bank |
| int8 | float32 | int8 (`Anchor.quantize_int8`) | the int8 bank |
| bfloat16 | bfloat16 | bfloat16 | the float bank, cast |
| int8-bf16 | bfloat16 | int8, quantized from bfloat16 | the int8 bank |

which are what `hmem serve` runs with `--dtype` float32 or bfloat16 and `--weights` float or
int8. Each int8 variant is compared with the float one of its activation dtype (a pair): accuracy
by bucket, as `hmem eval` scores it, and the log-probabilities of the same tokens,
teacher-forced: the float variant's greedy continuation (the tokens it chose, as many as
`hmem eval` decodes) and the expected answer. Those need the continuations' token ids, so each
variant is decoded and scored with `evaluate`'s own loop (`ask_facts`) on a model loaded here
(`load_variant`) rather than through `evaluate`: the float32 variant gives `hmem eval`'s
predictions exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.fidelity.builds import accuracy_cells
from server.bank.convert import convert_bank
from server.bank.reader import Bank
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor
from server.model.memory import MemoryBlock
from server.model.memory_batch import build_memory_batch
from server.tokenizer import AnchorTokenizer
from server.training.evaluate import answer_tokens, ask_facts, load_router
from server.training.facts import Fact
from server.training.queries import load_queries
from server.training.report import EvalReport, Prediction
from tiers.keys import BlockKey

INT8_MODES = ("memory", "anchor")
# variant -> (activation dtype, weights): the float ones read the float bank, int8 the int8 one.
VARIANTS = {
    "float32": ("float32", "float"),
    "int8": ("float32", "int8"),
    "bfloat16": ("bfloat16", "float"),
    "int8-bf16": ("bfloat16", "int8"),
}
# pair (its activation dtype) -> (the float variant, the int8 variant)
PAIRS = {"float32": ("float32", "int8"), "bfloat16": ("bfloat16", "int8-bf16")}
# Teacher-forced tokens: the float variant's greedy continuation, and the expected answer.
TOKENS = ("greedy", "answer")
INT8_BANK = "bank-int8"  # beside the default build's bank


@dataclass(frozen=True)
class Int8Task:
    build: str
    bank: Path  # the default build's (float) bank
    facts: Path
    rare: tuple[int, ...]  # the rarest buckets, rarest last
    device: str = "cpu"
    batch_size: int = 32


@dataclass
class _Variant:
    """One variant's answers: the predictions, and per mode each fact's decoded token ids."""

    predictions: list[Prediction]
    ids: dict[str, list[list[int]]]
    wall_s: float


class _Blocks:
    """The blocks of each fact's routed path in one bank, each block read once."""

    def __init__(self, bank: Bank, paths: Sequence[tuple[int, ...]]) -> None:
        levels = bank.manifest.memory_levels()
        cache: dict[tuple[int, int], MemoryBlock] = {}
        self.per_fact: list[list[MemoryBlock]] = []
        for path in paths:
            blocks = []
            for level, node in zip(levels, path, strict=True):
                if (level, node) not in cache:
                    key = BlockKey(bank.manifest.bank_id, level, node)
                    cache[(level, node)] = bank.read_block(key)
                blocks.append(cache[(level, node)])
            self.per_fact.append(blocks)

    def of(self, mode: str, i: int) -> list[MemoryBlock]:
        return self.per_fact[i] if mode == "memory" else []


def routed_paths(bank: Bank, queries: Sequence[str]) -> list[tuple[int, ...]]:
    """Each query's node per memory level, as `evaluate` routes it (nothing blocked)."""
    levels = bank.manifest.memory_levels()
    if not levels:
        return [() for _ in queries]
    routes = load_router(bank).route_texts(list(queries)).node_ids.tolist()
    return [tuple(route[level - 1] for level in levels) for route in routes]


def load_variant(bank: Bank, variant: str, device: str) -> Anchor:
    """The anchor as `hmem serve --dtype D --weights W` holds it (unfused when float: the
    model `hmem eval` scores)."""
    dtype, weights = VARIANTS[variant]
    model = load_anchor(bank.anchor_dir, dtype=getattr(torch, dtype), device=device)
    return model.quantize_int8() if weights == "int8" else model


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def decode_variant(
    model: Anchor,
    tokenizer: AnchorTokenizer,
    facts: Sequence[Fact],
    *,
    prompts: Sequence[list[int]],
    blocks: _Blocks,
    paths: Sequence[tuple[int, ...]],
    batch_size: int,
) -> _Variant:
    """Every fact asked in each mode, decoded and scored as `evaluate` does."""
    started = time.perf_counter()
    budgets = [answer_tokens(tokenizer, f.query, f.answer) + 1 for f in facts]
    predictions, ids = ask_facts(
        model,
        tokenizer,
        facts,
        modes=INT8_MODES,
        prompts=prompts,
        budgets=budgets,
        blocks=blocks.of,
        path=lambda i: paths[i] or None,
        batch_size=batch_size,
    )
    return _Variant(predictions, ids, time.perf_counter() - started)


@torch.inference_mode()
def token_logprobs(
    model: Anchor,
    prompts: Sequence[list[int]],
    targets: Sequence[list[int]],
    *,
    memory: Sequence[list[MemoryBlock]],
    batch_size: int,
) -> list[torch.Tensor]:
    """Per sequence, the float32 log-probability of each target token after its prompt and the
    targets before it (teacher-forced, one forward pass per batch)."""
    param = next(model.parameters())
    out: list[torch.Tensor] = []
    for idx in _batches(len(prompts), batch_size):
        seqs = [prompts[i] + targets[i] for i in idx]
        T = max(len(s) for s in seqs)
        # Right-padded: causal attention keeps a pad out of every real position's output.
        tokens = torch.tensor([[*s, *[0] * (T - len(s))] for s in seqs], device=param.device)
        mem = build_memory_batch([memory[i] for i in idx], dtype=param.dtype, device=param.device)
        logits = model(tokens, memory=mem)  # [B, T, vocab]
        logp = logits.float().log_softmax(dim=-1)  # [B, T, vocab]
        for row, i in enumerate(idx):
            n = len(prompts[i])
            chosen = torch.tensor(targets[i], dtype=torch.long, device=param.device)  # [m]
            # Position n - 1 + j predicts target j.
            at = logp[row, n - 1 : n - 1 + len(chosen)]  # [m, vocab]
            out.append(at.gather(-1, chosen[:, None])[:, 0].cpu())  # [m]
    return out


def answer_ids(tokenizer: AnchorTokenizer, fact: Fact, prompt: list[int]) -> list[int]:
    """The expected answer's tokens after the prompt: as the query and answer tokenize together
    where that keeps the prompt's tokens, else the answer alone."""
    whole = tokenizer.encode(fact.query + fact.answer)
    if whole[: len(prompt)] == prompt and len(whole) > len(prompt):
        return whole[len(prompt) :]
    return tokenizer.encode(fact.answer, add_bos=False)


def _differences(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> dict[str, Any]:
    diffs = torch.cat([(x - y).abs() for x, y in zip(a, b, strict=True)] + [torch.zeros(0)])
    if not diffs.numel():
        return {"mean": None, "max": None, "tokens": 0}
    return {"mean": float(diffs.mean()), "max": float(diffs.max()), "tokens": diffs.numel()}


def _changed(ref: list[Prediction], q: list[Prediction], mode: str) -> dict[str, int]:
    """Facts whose continuation int8 changed, and how many it made right or wrong."""
    pairs = [(r, p) for r, p in zip(ref, q, strict=True) if r.mode == mode]
    changed = [(r, p) for r, p in pairs if r.continuation != p.continuation]
    return {
        "facts": len(pairs),
        "changed": len(changed),
        "now_right": sum(p.correct and not r.correct for r, p in changed),
        "now_wrong": sum(r.correct and not p.correct for r, p in changed),
    }


def run_int8(task: Int8Task) -> dict[str, Any]:
    """Convert the bank (or reuse the conversion), ask every variant, compare each pair."""
    started = time.perf_counter()
    facts = load_queries(task.facts)
    banks = {"float": Bank.open(task.bank)}
    converted = convert_bank(
        task.bank, task.bank.parent / INT8_BANK, dtype="int8", concurrency=1, progress=False
    )
    banks["int8"] = Bank.open(task.bank.parent / INT8_BANK)
    models = {v: load_variant(banks[VARIANTS[v][1]], v, task.device) for v in VARIANTS}
    tokenizer = AnchorTokenizer.from_dir(banks["float"].anchor_dir, models["float32"].config)
    prompts = [tokenizer.encode(f.query) for f in facts]
    paths = routed_paths(banks["float"], [f.query for f in facts])
    blocks = {w: _Blocks(bank, paths) for w, bank in banks.items()}
    answers = {
        v: decode_variant(
            model,
            tokenizer,
            facts,
            prompts=prompts,
            blocks=blocks[VARIANTS[v][1]],
            paths=paths,
            batch_size=task.batch_size,
        )
        for v, model in models.items()
    }
    variants = {}
    for v, got in answers.items():
        report = EvalReport(str(banks[VARIANTS[v][1]].path), INT8_MODES, got.predictions)
        (task.bank.parent / f"eval-int8-{v}.json").write_text(report.to_json())
        dtype, weights = VARIANTS[v]
        variants[v] = {
            "dtype": dtype,
            "weights": weights,
            "bank": str(banks[weights].path),
            "accuracy": accuracy_cells(report, task.rare),
            "wall_s": got.wall_s,
        }
    expected = [answer_ids(tokenizer, f, p) for f, p in zip(facts, prompts, strict=True)]
    pairs: dict[str, Any] = {}
    for pair, (ref, q) in PAIRS.items():
        logprobs: dict[str, Any] = {}
        for mode in INT8_MODES:
            targets = {"greedy": answers[ref].ids[mode], "answer": expected}
            forced = {
                (v, kind): token_logprobs(
                    models[v],
                    prompts,
                    targets[kind],
                    memory=[blocks[VARIANTS[v][1]].of(mode, i) for i in range(len(facts))],
                    batch_size=task.batch_size,
                )
                for v in (ref, q)
                for kind in TOKENS
            }
            logprobs[mode] = {k: _differences(forced[(q, k)], forced[(ref, k)]) for k in TOKENS}
        pairs[pair] = {
            "reference": ref,
            "int8": q,
            "changed": {
                m: _changed(answers[ref].predictions, answers[q].predictions, m) for m in INT8_MODES
            },
            "logprobs": logprobs,
        }
    return {
        "bank_int8": str(banks["int8"].path),
        "convert": {
            "blocks": len(banks["int8"].manifest.blocks),
            "float_bytes": sum(e.bytes for e in banks["float"].manifest.blocks.values()),
            "int8_bytes": sum(e.bytes for e in banks["int8"].manifest.blocks.values()),
            "seconds": None if converted.complete else converted.seconds,
            "reused": converted.complete,
        },
        "variants": variants,
        "pairs": pairs,
        "wall_s": time.perf_counter() - started,
    }
