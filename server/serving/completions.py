"""`CompletionService`: completions, chat and the tokenizer endpoints, one call per API.

A request's prompts are checked against the limits and the context, tokenised (or taken as token
ids), their memory resolved (routed and fetched concurrently), then all `len(prompts) * n`
sequences are queued on the engine at once (all or none: a full queue is
`EngineOverloadedError`). What comes back is a `Completion` the caller streams or runs; the API
formats it. Every refusal is a `RequestError` (or a memory or engine error) naming its field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from server.engine.engine import Engine, EngineOverloadedError, EngineStats
from server.engine.memory import MemoryRequest, MemoryResolver, ResolvedMemory
from server.engine.sampling import SamplingParams, nth_seed
from server.engine.text import TextStream
from server.serving.completion import Choice, Completion
from server.serving.errors import UnknownModelError
from server.serving.limits import Limits
from server.serving.metrics import ServerMetrics
from server.serving.prompts import PromptInput, Prompts, Turn
from server.settings import KeyPolicy
from server.tokenizer import AnchorTokenizer

R = TypeVar("R")

DEFAULT_MAX_TOKENS = 16  # a completion request that names none (OpenAI's default)


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a request asks to sample, before its max_tokens is settled (`SamplingParams` checks
    every value, once)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            logprobs=self.logprobs,
            echo=self.echo,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
        )


class TokenizerWorker:
    """Tokenising off the event loop: one call at a time in a worker thread (the `tokenizers`
    batch call releases the GIL), at most `max_queued` waiting; past that a 429 (the engine's
    overload answer). A megabyte prompt then delays its own request, not every stream's next
    token (docs/serving.md, "Limits")."""

    def __init__(self, *, max_queued: int = 64) -> None:
        self.max_queued = max_queued
        self._queued = 0
        self._slot: asyncio.Semaphore | None = None  # made on the serving loop, at first use

    async def run(self, fn: Callable[[], R]) -> R:
        if self._queued >= self.max_queued:
            raise EngineOverloadedError(retry_after_s=1.0)
        if self._slot is None:
            self._slot = asyncio.Semaphore(1)
        self._queued += 1
        waiting = True
        try:
            async with self._slot:
                self._queued -= 1
                waiting = False
                return await asyncio.to_thread(fn)
        finally:
            if waiting:
                self._queued -= 1


class CompletionService:
    """Serves generation over a tokenizer, a memory resolver and an engine, within `limits`."""

    def __init__(
        self,
        *,
        tokenizer: AnchorTokenizer,
        vocab_size: int,
        resolver: MemoryResolver,
        engine: Engine,
        limits: Limits,
        model_name: str,
        metrics: ServerMetrics,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompts = Prompts(
            tokenizer, vocab_size=vocab_size, context_length=limits.context_length
        )
        self.resolver = resolver
        self.engine = engine
        self.limits = limits
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizing = TokenizerWorker()

    @property
    def context_length(self) -> int:
        return self.limits.context_length

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise UnknownModelError(name, self.model_name)

    def load(self) -> EngineStats:
        return self.engine.stats()

    # -- the APIs -------------------------------------------------------------------------------

    async def complete(
        self,
        *,
        model: str | None,
        prompts: Sequence[str | Sequence[int]],
        max_tokens: int | None,
        n: int,
        sampling: Sampling,
        memory: MemoryRequest,
        policy: KeyPolicy | None,
        arrived: float,
    ) -> Completion:
        """`/v1/completions`: each prompt (text or token ids) sampled `n` times."""
        self.check_model(model)
        asked = self.limits.check_max_tokens(
            DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        )
        self.limits.check_counts(prompts=len(prompts), n=n)
        for i, p in enumerate(prompts):  # before queueing for the tokenizer: a 400 at once
            if isinstance(p, str):
                self.prompts.check_length(p, param="prompt" if len(prompts) == 1 else f"prompt.{i}")
        inputs = await self.tokenizing.run(
            lambda: [self.prompts.of(p, index=i) for i, p in enumerate(prompts)]
        )
        return await self._start(inputs, sampling.params(asked), n, memory, policy, arrived)

    async def chat(
        self,
        *,
        model: str | None,
        turns: Sequence[Turn],
        add_generation_prompt: bool,
        max_tokens: int | None,
        n: int,
        sampling: Sampling,
        memory: MemoryRequest,
        policy: KeyPolicy | None,
        arrived: float,
    ) -> Completion:
        """`/v1/chat/completions`: the conversation rendered by the chat template, sampled `n`
        times; with no max_tokens, as many as the context leaves room for (as vLLM)."""
        self.check_model(model)
        self.limits.check_counts(prompts=1, n=n)
        prompt = await self.tokenizing.run(
            lambda: self.prompts.chat(turns, add_generation_prompt=add_generation_prompt)
        )
        asked = max_tokens if max_tokens is not None else self.limits.room(len(prompt.ids))
        params = sampling.params(self.limits.check_max_tokens(asked))
        return await self._start([prompt], params, n, memory, policy, arrived)

    async def tokenize(
        self, *, model: str | None, text: str, add_special_tokens: bool
    ) -> list[int]:
        self.check_model(model)
        self.prompts.check_length(text, param="prompt")
        return await self.tokenizing.run(
            lambda: self.tokenizer.encode(text, add_bos=add_special_tokens)
        )

    async def tokenize_chat(
        self,
        *,
        model: str | None,
        turns: Sequence[Turn],
        add_generation_prompt: bool,
        add_special_tokens: bool,
    ) -> list[int]:
        """The ids chat feeds the model; with `add_special_tokens`, a BOS before the template's."""
        self.check_model(model)
        prompt = await self.tokenizing.run(
            lambda: self.prompts.chat(turns, add_generation_prompt=add_generation_prompt)
        )
        ids = prompt.ids
        bos = self.tokenizer.bos_id
        if add_special_tokens and self.tokenizer.adds_bos and bos is not None:
            ids = [bos, *ids]
        return ids

    async def detokenize(self, *, model: str | None, ids: Sequence[int]) -> str:
        self.check_model(model)
        self.prompts.check_ids(ids, param="tokens", what="tokens")
        return await self.tokenizing.run(lambda: self.tokenizer.decode(list(ids)))

    # -- running --------------------------------------------------------------------------------

    async def _memories(
        self, prompts: Sequence[PromptInput], request: MemoryRequest, policy: KeyPolicy | None
    ) -> list[ResolvedMemory]:
        resolver = self.resolver
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

    async def _start(
        self,
        prompts: Sequence[PromptInput],
        params: SamplingParams,
        n: int,
        memory: MemoryRequest,
        policy: KeyPolicy | None,
        arrived: float,
    ) -> Completion:
        """Resolve every prompt's memory and queue its `n` sequences; all or none."""
        self.limits.check_context([len(p.ids) for p in prompts], params.max_tokens)
        memories = await self._memories(prompts, memory, policy)
        jobs = []
        for p, mem in zip(prompts, memories, strict=True):
            for j in range(n):
                seeded = params
                if params.seed is not None and j:
                    seeded = replace(params, seed=nth_seed(params.seed, j))
                jobs.append((p.ids, seeded, mem.blocks))
        try:
            sequences = self.engine.submit(jobs)
        except EngineOverloadedError:
            self.metrics.rejected.labels("overloaded").inc()
            raise
        prompt_tokens = sum(len(p.ids) for p in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        choices = [
            Choice(
                index=i,
                prompt=prompts[i // n],
                sequence=s,
                stream=TextStream(self.tokenizer, params.stop),
            )
            for i, s in enumerate(sequences)
        ]
        return Completion(choices, memories, prompt_tokens, arrived, self.metrics)
