"""What the engine's tests share: a tiny random anchor, random FFN memory blocks, and helpers
that run a sequence to its end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from server.engine.engine import (
    EndEvent,
    EngineSequence,
    Event,
    TokenEvent,
)
from server.engine.sampling import SamplingParams
from server.model.config import PRESETS
from server.model.memory import FFNBlock, MemoryBlock

# Long enough that a sequence asked for thousands of tokens is still running while a test looks.
CFG = replace(PRESETS["test"], max_seq_len=4096)
V = CFG.vocab_size
LONG = 4000  # max_tokens of a sequence that a test cancels or closes long before it ends

Request = tuple[list[int], SamplingParams, list[MemoryBlock]]


def block(width: int, seed: int) -> MemoryBlock:
    g = torch.Generator().manual_seed(seed)
    L, d = CFG.n_layers, CFG.d_model

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    return FFNBlock(gate=rnd(L, width, d), up=rnd(L, width, d), down=rnd(L, d, width))


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, V, (length,), generator=g).tolist()


def greedy(max_tokens: int, **extra: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    reason: str | None = None


async def collect(gen: EngineSequence, stream: AsyncIterator[Event] | None = None) -> Run:
    """Every event of `gen` to its end (going on with `stream` when one was started)."""
    run = Run()
    async for event in stream if stream is not None else gen.stream():
        run.events.append(event)
        if isinstance(event, TokenEvent):
            run.tokens.append(event.token)
        elif isinstance(event, EndEvent):
            run.reason = event.reason
    return run


async def first_tokens(stream: AsyncIterator[Event], n: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < n:
        event = await anext(stream)
        assert isinstance(event, TokenEvent), event
        tokens.append(event.token)
    return tokens
