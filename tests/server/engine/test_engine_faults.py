"""The engine: no request can fail another. A corrupt memory block, a sequence poisoned mid-flight,
sampling values that cannot be sampled, a block that breaks the forward pass: each ends (or is
served) alone, and the sequences beside it decode exactly as they would alone."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import torch

from server.engine.engine import (
    EndEvent,
    Engine,
    PromptEvent,
    TokenEvent,
)
from server.engine.sampling import SamplingParams
from server.model.anchor import Anchor
from server.model.memory import LORA_TARGETS, FFNBlock, LoRABlock, MemoryBlock
from server.training.evaluate import greedy_decode
from tests.server.engine.engine_helpers import (
    CFG,
    Request,
    block,
    collect,
    first_tokens,
    greedy,
    prompt,
)

# -- one request cannot fail another -------------------------------------------------------------


def nan_block(width: int) -> MemoryBlock:
    """What a corrupt block looks like to the model: weights that are NaN (its logits are NaN)."""
    good = block(width, seed=90)
    assert isinstance(good, FFNBlock)
    return FFNBlock(gate=good.gate, up=good.up, down=torch.full_like(good.down, float("nan")))


def dozen() -> list[Request]:
    """Twelve greedy sequences of different lengths and memories; some longer than others, so a
    batch's attention spans positions past the short ones' (where a stale NaN would reach them)."""
    memories = [[], [block(4, seed=91)], [block(8, seed=92), block(4, seed=93)]]
    return [(prompt(2 + 3 * i, 90 + i), greedy(6 + i), memories[i % 3]) for i in range(12)]


def alone(model: Anchor, requests: list[Request]) -> list[list[int]]:
    return [
        greedy_decode(model, [p], max_new_tokens=params.max_tokens, memory=[m])[0]
        for p, params, m in requests
    ]


async def test_a_corrupt_memory_block_ends_its_own_sequence_and_no_other(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    requests = dozen()
    engine = engines(max_batch=16)
    poisoned: list[Request] = [
        (prompt(40, 98), greedy(20), [block(4, seed=94), nan_block(4)]),
        # prompt logprobs are computed from the same NaN logits: no NaN reaches the client
        (prompt(30, 99), greedy(20, logprobs=3, echo=True), [nan_block(8)]),
        (prompt(9, 96), SamplingParams(max_tokens=20, temperature=0.8), [nan_block(4)]),
    ]
    # The poisoned ones are admitted in the middle of the batch: retiring them moves healthy
    # rows into their cache rows.
    gens = engine.submit([*requests[:6], *poisoned, *requests[6:]])
    runs = await asyncio.gather(*(collect(g) for g in gens))
    healthy, bad = [*runs[:6], *runs[9:]], runs[6:9]

    assert [r.tokens for r in healthy] == alone(model, requests)
    assert all(r.reason == "length" for r in healthy)
    for run in bad:
        assert run.reason == "error"
        assert run.tokens == []
        end = run.events[-1]
        assert isinstance(end, EndEvent)
        assert end.error is not None
        assert "not finite" in end.error
        assert not any(isinstance(e, PromptEvent) for e in run.events)
    assert engine.stats().errors == 3

    # The engine goes on, and the rows the poisoned sequences held serve new work exactly.
    again = dozen()[::-1]
    runs = await asyncio.gather(*(collect(g) for g in engine.submit(again)))
    assert [r.tokens for r in runs] == alone(model, again)


async def test_a_sequence_poisoned_mid_flight_ends_alone(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    engine = engines(max_batch=16)
    requests = dozen()
    gens = engine.submit(requests)
    (poisoned,) = engine.submit([(prompt(12, 97), greedy(30), [nan_block(4)])])
    runs = await asyncio.gather(*(collect(g) for g in gens))
    assert [r.tokens for r in runs] == alone(model, requests)
    assert (await collect(poisoned)).reason == "error"


# Values that pass validation but used to reach torch.multinomial as an invalid distribution,
# failing every sequence of the batch: vLLM reads them as greedy / the top token, and so do we.
POISONED_PARAMS = [
    {"temperature": 2.2e-309},
    {"temperature": 5e-324, "seed": 3},
    {"temperature": 1e-6},
    {"top_p": 5e-324},
    {"top_p": 1e-45, "seed": 4},
    {"temperature": 1.0, "top_p": 2.2e-309, "logprobs": 0},
]


async def test_unsampleable_temperature_or_top_p_decode_greedily_beside_others(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    requests = dozen()
    engine = engines(max_batch=16)
    tiny: list[Request] = [
        (prompt(5, 110 + i), SamplingParams(max_tokens=8, **fields), [block(4, seed=95)])
        for i, fields in enumerate(POISONED_PARAMS)
    ]
    gens = engine.submit([*tiny[:3], *requests, *tiny[3:]])
    runs = await asyncio.gather(*(collect(g) for g in gens))
    assert [r.tokens for r in runs] == alone(model, [*tiny[:3], *requests, *tiny[3:]])
    assert all(r.reason == "length" for r in runs)
    logprobs_run = runs[-1]
    for e in logprobs_run.events[:-1]:
        assert isinstance(e, TokenEvent)
        assert e.top == []
        assert math.isfinite(e.logprob)
    assert engine.stats().errors == 0


def misshapen_block() -> MemoryBlock:
    """A block of another model's width: the forward pass cannot multiply it (it raises)."""
    L, d, r = CFG.n_layers, CFG.d_model + 8, 4
    return FFNBlock(gate=torch.randn(L, r, d), up=torch.randn(L, r, d), down=torch.randn(L, d, r))


async def test_a_block_that_breaks_the_forward_pass_fails_only_its_sequence(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    requests = dozen()
    engine = engines(max_batch=16)
    broken: Request = (prompt(6, 100), greedy(5), [misshapen_block()])
    # Admitted in one prefill with the dozen, then alone into a running batch.
    gens = engine.submit([*requests[:4], broken, *requests[4:]])
    (late,) = engine.submit([broken])
    runs = await asyncio.gather(*(collect(g) for g in gens))
    late_run = await collect(late)
    for run in (runs[4], late_run):
        assert run.reason == "error"
        assert run.tokens == []
        end = run.events[-1]
        assert isinstance(end, EndEvent)
        assert end.error == "generation failed: RuntimeError"
    healthy = [*runs[:4], *runs[5:]]
    assert [r.tokens for r in healthy] == alone(model, requests)
    (after,) = engine.submit([requests[0]])
    assert (await collect(after)).tokens == alone(model, requests[:1])[0]


def lora_block(seed: int) -> MemoryBlock:
    g = torch.Generator().manual_seed(seed)
    L, r, d = CFG.n_layers, 4, CFG.d_model
    dims = {"q": (d, d), "k": (d, 16), "v": (d, 16), "o": (d, d)}  # target -> (in, out)
    dims |= {"gate": (d, 64), "up": (d, 64), "down": (64, d)}
    assert set(dims) == set(LORA_TARGETS)
    return LoRABlock(
        a={t: torch.randn(L, r, i, generator=g) * 0.3 for t, (i, _) in dims.items()},
        b={t: torch.randn(L, o, r, generator=g) * 0.3 for t, (_, o) in dims.items()},
    )


async def test_sequences_that_cannot_share_a_forward_pass_run_row_by_row(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    """Two memory types cannot be stacked into one batch: each row then runs alone, exactly."""
    engine = engines(max_batch=4)
    ffn: Request = (prompt(5, 120), greedy(12), [block(4, seed=120)])
    lora: Request = (prompt(7, 121), greedy(8), [lora_block(121)])
    (first,) = engine.submit([ffn])
    stream = first.stream()
    head = await first_tokens(stream, 1)
    (second,) = engine.submit([lora])
    first_run, second_run = await asyncio.gather(collect(first, stream), collect(second))
    assert head + first_run.tokens == alone(model, [ffn])[0]
    assert second_run.tokens == alone(model, [lora])[0]
    assert engine.stats().errors == 0
