"""Generation requests, below the HTTP layer: what completions and chat share.

A request's prompts are checked against the server's limits and the context, tokenised (or
taken as token ids), their memory resolved (routed and fetched concurrently), then all
`len(prompts) * n` sequences are queued on the engine at once (all or none: a full queue is
`EngineOverloadedError`). Each `Choice` turns the engine's events into text (`TextStream`: no
half characters, stop strings cut before they are sent), token logprobs and a finish reason.

This module never sees an HTTP request: the API formats what it returns, and maps its errors
(`RequestError` and subclasses, the memory and engine errors) to status codes in one place.
Choice `i * n + j` is prompt i's j-th sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from server.engine.engine import (
    EndEvent,
    EngineOverloadedError,
    Generation,
    PromptEvent,
    TokenEvent,
)
from server.engine.memory import MemoryRequest, ResolvedMemory
from server.engine.sampling import SamplingParams, TopLogprobs
from server.engine.text import TextStream
from server.metrics import ServerMetrics
from server.runtime import Runtime
from server.settings import KeyPolicy

__all__ = [
    "Choice",
    "ChoiceEnd",
    "ContextLengthError",
    "Delta",
    "GenerationJob",
    "Generator",
    "PromptInput",
    "RequestError",
    "UnknownModelError",
]


class RequestError(ValueError):
    """A request the server cannot serve as asked; `param` names the field to change."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code or "invalid_value"


class ContextLengthError(RequestError):
    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class UnknownModelError(RequestError):
    def __init__(self, name: str, served: str) -> None:
        super().__init__(
            f"model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


ChoiceEnd = Literal["stop", "length", "error"]


@dataclass(frozen=True, slots=True)
class PromptInput:
    """One prompt as the engine takes it, and the text the response and the router see."""

    ids: list[int]
    text: str  # what echo returns
    route_text: str  # what routing embeds (chat: the user turns, docs/serving.md)
    bos: bool  # ids[0] is a BOS the server added (not echoed)


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
    gen: Generation
    stream: TextStream
    tokens: list[TokenInfo] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each token's text starts
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None
    finish_reason: ChoiceEnd | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.stream.text


@dataclass
class GenerationJob:
    """The sequences of one request, as the engine runs them."""

    choices: list[Choice]
    memories: list[ResolvedMemory]
    prompt_tokens: int
    arrived: float
    memory_label: str  # "on" or "off": the metrics' label

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def cancel(self) -> None:
        for c in self.choices:
            c.gen.cancel()


class Generator:
    """Tokenises, resolves memory, submits and decodes, over one `Runtime`."""

    def __init__(self, runtime: Runtime, metrics: ServerMetrics) -> None:
        self.rt = runtime
        self.metrics = metrics
        # Per-token counters, looked up once rather than by label on every token.
        self._tokens_counted = {m: metrics.tokens.labels(m) for m in ("on", "off")}

    # -- checks and prompts ---------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.rt.model_name:
            raise UnknownModelError(name, self.rt.model_name)

    def max_tokens(self, asked: int | None, *, default: int = 16) -> int:
        limit = self.rt.settings.max_tokens_limit
        value = default if asked is None else asked
        if not 1 <= value <= limit:
            raise RequestError(
                f"max_tokens must be between 1 and {limit}, got {value}", param="max_tokens"
            )
        return value

    def room(self, prompt: PromptInput) -> int:
        """The most tokens `prompt` leaves room for: a default max_tokens (chat, as vLLM)."""
        room = self.rt.context_length - len(prompt.ids)
        return max(1, min(room, self.rt.settings.max_tokens_limit))

    def check_counts(self, *, prompts: int, n: int) -> None:
        s = self.rt.settings
        if n > s.max_n:
            raise RequestError(f"n must be at most {s.max_n}, got {n}", param="n")
        if prompts > s.max_prompts:
            raise RequestError(
                f"at most {s.max_prompts} prompts per request, got {prompts}", param="prompt"
            )
        if prompts * n > s.max_batch + s.max_queue:
            raise RequestError(
                f"{prompts} prompts x n={n} sequences can never fit this server's "
                f"{s.max_batch + s.max_queue} slots and queue places",
                param="n",
            )

    def text_prompt(self, text: str, *, route_text: str | None = None) -> PromptInput:
        tok = self.rt.tokenizer
        return PromptInput(tok.encode(text), text, route_text or text, bos=tok.bos_id is not None)

    def chat_prompt(self, rendered: str, *, route_text: str) -> PromptInput:
        """A prompt rendered by the chat template, which writes the BOS itself (as vLLM does)."""
        ids = self.rt.tokenizer.encode(rendered, add_bos=False)
        return PromptInput(ids, rendered, route_text, bos=False)

    def check_ids(self, ids: Sequence[int], *, param: str, what: str) -> None:
        vocab = self.rt.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"{what} has token ids outside 0..{vocab - 1}: {bad[:5]}", param=param
            )

    def token_prompt(self, ids: Sequence[int], *, index: int) -> PromptInput:
        """A prompt given as token ids, with the BOS a string prompt gets.

        The model was trained with a BOS before every document, and clients that tokenise for
        themselves (lm-evaluation-harness asks `/tokenize` without special tokens) send none:
        without it, the same text would score differently as ids than as a string. Ids that
        already start with the BOS are taken as they are. Either way the BOS is not echoed.
        """
        self.check_ids(ids, param="prompt", what=f"prompt {index}")
        tok = self.rt.tokenizer
        ids = list(ids)
        text = tok.decode(ids)
        if tok.bos_id is None:
            return PromptInput(ids, text, text, bos=False)
        if not ids or ids[0] != tok.bos_id:
            ids = [tok.bos_id, *ids]
        return PromptInput(ids, text, text, bos=True)

    def check_context(self, prompts: Sequence[PromptInput], max_tokens: int) -> None:
        limit = self.rt.context_length
        for i, p in enumerate(prompts):
            if not p.ids:
                raise RequestError(f"prompt {i} encodes to no tokens", param="prompt")
            if len(p.ids) + max_tokens > limit:
                raise ContextLengthError(
                    f"prompt {i} is {len(p.ids)} tokens and max_tokens is {max_tokens}: "
                    f"together more than the context length of {limit} tokens",
                    param="prompt" if len(p.ids) >= limit else "max_tokens",
                )

    # -- running --------------------------------------------------------------------------------

    async def _memories(
        self, prompts: Sequence[PromptInput], request: MemoryRequest, policy: KeyPolicy | None
    ) -> list[ResolvedMemory]:
        resolver = self.rt.resolver
        resolver.check(request, policy)
        started = time.perf_counter()
        resolved = await asyncio.gather(
            *(resolver.resolve(p.route_text, request, policy) for p in prompts)
        )
        self.metrics.memory_fetch.observe(time.perf_counter() - started)
        for r in resolved:
            for d in r.degraded:
                self.metrics.degraded.labels(str(d.level), d.reason).inc()
        return list(resolved)

    async def start(
        self,
        prompts: Sequence[PromptInput],
        params: SamplingParams,
        *,
        n: int,
        memory: MemoryRequest,
        policy: KeyPolicy | None,
        arrived: float,
    ) -> GenerationJob:
        """Resolve every prompt's memory and queue its `n` sequences; all or none."""
        self.check_context(prompts, params.max_tokens)
        memories = await self._memories(prompts, memory, policy)
        jobs = []
        for p, mem in zip(prompts, memories, strict=True):
            for j in range(n):
                seeded = params
                if params.seed is not None and j:
                    seeded = replace(params, seed=params.seed + j)
                jobs.append((p.ids, seeded, mem.blocks))
        try:
            gens = self.rt.engine.submit(jobs)
        except EngineOverloadedError:
            self.metrics.rejected.labels("overloaded").inc()
            raise
        prompt_tokens = sum(len(p.ids) for p in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        choices = [
            Choice(index=i, prompt=prompts[i // n], gen=g, stream=self._text(params))
            for i, g in enumerate(gens)
        ]
        label = "off" if all(not m.blocks for m in memories) else "on"
        return GenerationJob(choices, memories, prompt_tokens, arrived, label)

    def _text(self, params: SamplingParams) -> TextStream:
        return TextStream(self.rt.tokenizer, params.stop)

    # -- consuming the engine's events ----------------------------------------------------------

    def _on_token(self, job: GenerationJob, c: Choice, ev: TokenEvent) -> Delta:
        if not c.tokens and c.index == 0:
            self.metrics.ttft.labels(job.memory_label).observe(time.perf_counter() - job.arrived)
        self._tokens_counted[job.memory_label].inc()
        c.offsets.append(len(c.stream.text))
        token = TokenInfo(ev.token, ev.logprob, ev.top)
        c.tokens.append(token)
        text = c.stream.push(ev.token)
        if c.stream.stopped:
            c.finish_reason = "stop"
            c.gen.cancel()
        return Delta(c, text, token)

    def _on_end(self, c: Choice, ev: EndEvent) -> Delta:
        if c.finish_reason is None:
            if ev.reason == "error":
                c.finish_reason = "error"
                c.error = ev.error or "generation failed"
            else:
                c.finish_reason = "length" if ev.reason == "length" else "stop"
        return Delta(c, c.stream.finish())

    async def deltas(self, job: GenerationJob, c: Choice) -> AsyncIterator[Delta]:
        """One choice's deltas, ending with one `finished` delta; its sequence is freed after."""
        try:
            async for ev in c.gen.stream():
                if isinstance(ev, PromptEvent):
                    c.prompt_logprobs = ev.logprobs
                elif isinstance(ev, TokenEvent):
                    yield self._on_token(job, c, ev)
                    if c.stream.stopped:
                        break
                else:
                    yield self._on_end(c, ev)
            if c.stream.stopped:
                yield Delta(c, c.stream.finish())
        finally:
            c.gen.cancel()
        yield Delta(c, "", finished=True)

    async def stream(self, job: GenerationJob) -> AsyncIterator[Delta]:
        """Every choice's deltas, interleaved as they come."""
        if len(job.choices) == 1:  # one stream (the common case): no task, no queue
            async for d in self.deltas(job, job.choices[0]):
                yield d
            return
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        async def pump(c: Choice) -> None:
            async for d in self.deltas(job, c):
                await queue.put(d)

        tasks = [asyncio.create_task(pump(c)) for c in job.choices]
        try:
            done = 0
            while done < len(job.choices):
                d = await queue.get()
                done += d.finished
                yield d
        finally:
            job.cancel()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, job: GenerationJob) -> None:
        """Run every choice to its end (non-streaming); the sequences are freed after."""
        try:
            await asyncio.gather(*(self._drain(job, c) for c in job.choices))
        finally:
            job.cancel()

    async def _drain(self, job: GenerationJob, c: Choice) -> None:
        async for _ in self.deltas(job, c):
            pass
