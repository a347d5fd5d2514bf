"""One request's sequences as the engine runs them: a `Completion` and its `Choice`s.

Choice `i * n + j` is prompt i's j-th sample. Each turns its engine sequence's events into text
(`TextStream`: no half characters, stop strings cut before they are sent), token logprobs and a
finish reason. A completion is consumed once, streamed (`stream`) or run to its end (`run`);
either way its sequences are freed when the consumer stops, and `cancel` frees them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from server.engine.engine import EndEvent, EngineSequence, PromptEvent, TokenEvent
from server.engine.memory import ResolvedMemory
from server.engine.sampling import TopLogprobs
from server.engine.text import TextStream
from server.serving.metrics import ServerMetrics
from server.serving.prompts import PromptInput

ChoiceEnd = Literal["stop", "length", "error"]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One generated token: its id, logprob, and the alternatives asked for."""

    id: int
    logprob: float
    top: TopLogprobs | None  # the top-k, most likely first; None when logprobs were not asked


@dataclass(frozen=True, slots=True)
class Delta:
    """What a choice adds: text (maybe empty), the token that produced it, or its end."""

    choice: Choice
    text: str
    token: TokenInfo | None = None
    finished: bool = False


@dataclass(eq=False)
class Choice:
    index: int
    prompt: PromptInput
    sequence: EngineSequence  # the engine's sequence
    stream: TextStream
    tokens: list[TokenInfo] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each token's text starts
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None
    finish_reason: ChoiceEnd | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.stream.text


@dataclass(eq=False)
class Completion:
    """The sequences of one request, queued on the engine, and the memory they decode with."""

    choices: list[Choice]
    memories: list[ResolvedMemory]  # per prompt
    prompt_tokens: int
    arrived: float  # perf_counter at arrival: time to first token counts from here
    metrics: ServerMetrics
    memory_label: Literal["on", "off"] = field(init=False)

    def __post_init__(self) -> None:
        self.memory_label = "off" if all(not m.blocks for m in self.memories) else "on"

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def failed(self) -> Choice | None:
        """The first choice whose sequence failed, if any."""
        return next((c for c in self.choices if c.finish_reason == "error"), None)

    def cancel(self) -> None:
        for c in self.choices:
            c.sequence.cancel()

    # -- consuming the engine's events ----------------------------------------------------------

    def _on_token(self, c: Choice, ev: TokenEvent) -> Delta:
        if not c.tokens and c.index == 0:
            self.metrics.ttft.labels(self.memory_label).observe(time.perf_counter() - self.arrived)
        self.metrics.tokens_by_memory[self.memory_label].inc()
        c.offsets.append(len(c.stream.text))
        token = TokenInfo(ev.token, ev.logprob, ev.top)
        c.tokens.append(token)
        text = c.stream.push(ev.token)
        if c.stream.stopped:
            c.finish_reason = "stop"
            c.sequence.cancel()
        return Delta(c, text, token)

    @staticmethod
    def _on_end(c: Choice, ev: EndEvent) -> Delta:
        if c.finish_reason is None:
            if ev.reason == "error":
                c.finish_reason = "error"
                c.error = ev.error or "generation failed"
            else:
                c.finish_reason = "length" if ev.reason == "length" else "stop"
        return Delta(c, c.stream.finish())

    async def deltas(self, c: Choice) -> AsyncIterator[Delta]:
        """One choice's deltas, ending with one `finished` delta; its sequence is freed after."""
        try:
            async for ev in c.sequence.stream():
                if isinstance(ev, PromptEvent):
                    c.prompt_logprobs = ev.logprobs
                elif isinstance(ev, TokenEvent):
                    yield self._on_token(c, ev)
                    if c.stream.stopped:
                        break
                else:
                    yield self._on_end(c, ev)
            if c.stream.stopped:
                yield Delta(c, c.stream.finish())
        finally:
            c.sequence.cancel()
        yield Delta(c, "", finished=True)

    async def stream(self) -> AsyncIterator[Delta]:
        """Every choice's deltas, interleaved as they come."""
        if len(self.choices) == 1:  # one stream (the common case): no task, no queue
            async for d in self.deltas(self.choices[0]):
                yield d
            return
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        async def pump(c: Choice) -> None:
            async for d in self.deltas(c):
                await queue.put(d)

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            done = 0
            while done < len(self.choices):
                d = await queue.get()
                done += d.finished
                yield d
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self) -> None:
        """Run every choice to its end (non-streaming); the sequences are freed after."""
        try:
            await asyncio.gather(*(self._drain(c) for c in self.choices))
        finally:
            self.cancel()

    async def _drain(self, c: Choice) -> None:
        async for _ in self.deltas(c):
            pass
