"""`POST /v1/completions`: OpenAI's legacy completion API, with the `memory` extension.

A request's prompts are tokenised and checked against the context, each prompt's memory is
resolved (routed and fetched concurrently), then all `len(prompts) * n` sequences are queued on
the engine at once (all or none: a full queue is a 429). Each choice turns the engine's token
ids into text (`TextStream`: no half characters, stop strings cut before they are sent) and,
when asked, OpenAI's logprobs object. Choice `i * n + j` is prompt i's j-th sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from server.api.errors import APIError
from server.api.metrics import ServerMetrics
from server.api.schemas import CompletionRequest
from server.engine.engine import (
    EndEvent,
    EngineClosedError,
    EngineOverloadedError,
    Generation,
    PromptEvent,
    TokenEvent,
)
from server.engine.memory import (
    MemoryForbiddenError,
    MemoryRequest,
    MemoryRequestError,
    ResolvedMemory,
)
from server.engine.sampling import SamplingParams
from server.engine.text import TextStream, token_strings
from server.runtime import Runtime
from server.settings import KeyPolicy

_DISCONNECT_POLL_S = 0.25


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # what echo returns and what routing embeds
    bos: bool  # ids[0] is a BOS the tokenizer added (not echoed)


@dataclass
class _Choice:
    index: int
    prompt: _Prompt
    gen: Generation
    stream: TextStream
    want_logprobs: bool
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # streaming: where each token's text starts
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None


class Completions:
    """The completion endpoint's logic, over one `Runtime`."""

    def __init__(self, runtime: Runtime, metrics: ServerMetrics) -> None:
        self.rt = runtime
        self.metrics = metrics
        # Per-token counters, looked up once rather than by label on every token.
        self._tokens_counted = {m: metrics.tokens.labels(m) for m in ("on", "off")}

    # -- checks -------------------------------------------------------------------------------

    def _check(self, req: CompletionRequest) -> int:
        s = self.rt.settings
        if req.model is not None and req.model != self.rt.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {self.rt.model_name!r}",
                param="model",
                code="model_not_found",
            )
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if not 1 <= max_tokens <= s.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens must be between 1 and {s.max_tokens_limit}, got {max_tokens}",
                param="max_tokens",
                code="invalid_value",
            )
        if req.n > s.max_n:
            raise APIError(
                400, f"n must be at most {s.max_n}, got {req.n}", param="n", code="invalid_value"
            )
        prompts = req.prompts()
        if len(prompts) > s.max_prompts:
            raise APIError(
                400,
                f"at most {s.max_prompts} prompts per request, got {len(prompts)}",
                param="prompt",
                code="invalid_value",
            )
        if len(prompts) * req.n > s.max_batch + s.max_queue:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={req.n} sequences can never fit this server's "
                f"{s.max_batch + s.max_queue} slots and queue places",
                param="n",
                code="invalid_value",
            )
        if req.stream and req.logprobs is not None and req.echo:
            raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
        return max_tokens

    def _tokenise(self, prompts: list[str | list[int]], max_tokens: int) -> list[_Prompt]:
        tok = self.rt.tokenizer
        vocab = self.rt.model.config.vocab_size
        limit = self.rt.context_length
        out: list[_Prompt] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = tok.encode(p)
                prompt = _Prompt(ids, p, bos=tok.bos_id is not None)
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise APIError(
                        400,
                        f"prompt {i} has token ids outside 0..{vocab - 1}: {bad[:5]}",
                        param="prompt",
                        code="invalid_value",
                    )
                prompt = _Prompt(list(p), tok.decode(list(p)), bos=False)
            if not prompt.ids:
                raise APIError(400, f"prompt {i} encodes to no tokens", param="prompt")
            if len(prompt.ids) + max_tokens > limit:
                raise APIError(
                    400,
                    f"prompt {i} is {len(prompt.ids)} tokens and max_tokens is {max_tokens}: "
                    f"together more than the context length of {limit} tokens",
                    param="prompt" if len(prompt.ids) >= limit else "max_tokens",
                    code="context_length_exceeded",
                )
            out.append(prompt)
        return out

    async def _memories(
        self, req: CompletionRequest, prompts: list[_Prompt], policy: KeyPolicy | None
    ) -> list[ResolvedMemory]:
        m = req.memory
        request = MemoryRequest(
            mode=m.mode,
            path=None if m.path is None else tuple(m.path),
            levels=None if m.levels is None else tuple(m.levels),
        )
        resolver = self.rt.resolver
        try:
            resolver.check(request, policy)
        except MemoryForbiddenError as exc:
            raise APIError(403, str(exc), param=exc.param, code=exc.code) from None
        except MemoryRequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        started = time.perf_counter()
        resolved = await asyncio.gather(
            *(resolver.resolve(p.text, request, policy) for p in prompts)
        )
        self.metrics.memory_fetch.observe(time.perf_counter() - started)
        for r in resolved:
            for d in r.degraded:
                self.metrics.degraded.labels(str(d.level), d.reason).inc()
        return list(resolved)

    # -- the endpoint -------------------------------------------------------------------------

    async def __call__(
        self, req: CompletionRequest, policy: KeyPolicy | None, request: Request
    ) -> Response:
        arrived = time.perf_counter()
        max_tokens = self._check(req)
        prompts = self._tokenise(req.prompts(), max_tokens)
        memories = await self._memories(req, prompts, policy)
        jobs = []
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                logprobs=req.logprobs,
                echo=req.echo,
                stop=req.stops(),
                ignore_eos=req.ignore_eos,
            )
            for p, mem in zip(prompts, memories, strict=True):
                for j in range(req.n):
                    seeded = params
                    if req.seed is not None and j:
                        seeded = replace(params, seed=req.seed + j)
                    jobs.append((p.ids, seeded, mem.blocks))
        except ValueError as exc:  # a value the schema lets through but sampling cannot use
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
        try:
            gens = self.rt.engine.submit(jobs)
        except EngineOverloadedError as exc:
            self.metrics.rejected.labels("overloaded").inc()
            raise APIError(
                429,
                "the server is at capacity; retry after the time in Retry-After",
                code="server_overloaded",
                headers={"Retry-After": str(round(exc.retry_after_s))},
            ) from None
        except EngineClosedError:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        self.metrics.prompt_tokens.inc(sum(len(p.ids) for p in prompts))
        choices = [
            _Choice(
                index=i,
                prompt=prompts[i // req.n],
                gen=g,
                stream=TextStream(self.rt.tokenizer, req.stops()),
                want_logprobs=req.logprobs is not None,
            )
            for i, g in enumerate(gens)
        ]
        memory_label = "off" if all(not m.blocks for m in memories) else "on"
        memory_field: Any = (
            memories[0].as_dict() if req.single_prompt() else [m.as_dict() for m in memories]
        )
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.rt.model_name,
        }
        usage_prompt = sum(len(p.ids) for p in prompts)
        if req.stream:
            return StreamingResponse(
                self._sse(req, choices, head, memory_field, usage_prompt, arrived, memory_label),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, gens))
        try:
            await asyncio.gather(*(self._collect(c, arrived, memory_label) for c in choices))
        finally:
            watcher.cancel()
            for g in gens:
                g.cancel()
        if any(c.finish_reason == "error" for c in choices):
            raise APIError(500, "generation failed; see the server log", code="internal_error")
        completion_tokens = sum(len(c.tokens) for c in choices)
        body = {
            **head,
            "choices": [self._final_choice(c, req) for c in choices],
            "usage": {
                "prompt_tokens": usage_prompt,
                "completion_tokens": completion_tokens,
                "total_tokens": usage_prompt + completion_tokens,
            },
            "memory": memory_field,
        }
        return JSONResponse(body)

    # -- consuming the engine's events ----------------------------------------------------------

    def _on_token(self, c: _Choice, ev: TokenEvent, arrived: float, label: str) -> str:
        if c.first_token_at is None:
            c.first_token_at = time.perf_counter()
            if c.index == 0:
                self.metrics.ttft.labels(label).observe(c.first_token_at - arrived)
        self._tokens_counted[label].inc()
        c.offsets.append(len(c.stream.text))
        c.tokens.append(ev.token)
        c.logprobs.append(ev.logprob)
        c.tops.append(ev.top)
        delta = c.stream.push(ev.token)
        if c.stream.stopped:
            c.finish_reason = "stop"
            c.gen.cancel()
        return delta

    def _on_end(self, c: _Choice, ev: EndEvent) -> str:
        if c.finish_reason is None:
            c.finish_reason = {"stop": "stop", "length": "length", "error": "error"}.get(
                ev.reason, "stop"
            )
        return c.stream.finish()

    async def _collect(self, c: _Choice, arrived: float, label: str) -> None:
        async for ev in c.gen.stream():
            if isinstance(ev, PromptEvent):
                c.prompt_logprobs = ev.logprobs
            elif isinstance(ev, TokenEvent):
                self._on_token(c, ev, arrived, label)
                if c.stream.stopped:
                    break
            else:
                self._on_end(c, ev)
        if c.finish_reason == "stop" and c.stream.stopped:
            c.stream.finish()

    def _final_choice(self, c: _Choice, req: CompletionRequest) -> dict[str, Any]:
        prefix = c.prompt.text if req.echo else ""
        text = prefix + c.stream.text
        logprobs = None
        if c.want_logprobs:
            tok = self.rt.tokenizer
            strings = token_strings(tok, c.tokens)
            offsets = [len(prefix) + o for o in c.stream.token_offsets()]
            lps: list[float | None] = list(c.logprobs)
            tops = [_top_dict(tok, t) for t in c.tops]
            if req.echo:
                p_ids = c.prompt.ids[1:] if c.prompt.bos else c.prompt.ids
                p_lp = (c.prompt_logprobs or [])[1:] if c.prompt.bos else c.prompt_logprobs or []
                p_strings = token_strings(tok, p_ids)
                p_offsets, at = [], 0
                for s in p_strings:
                    p_offsets.append(min(at, len(prefix)))
                    at += len(s)
                strings = p_strings + strings
                offsets = p_offsets + offsets
                lps = [lp for lp, _ in p_lp] + lps
                tops = [
                    _top_dict(tok, alts) if lp is not None else None for lp, alts in p_lp
                ] + tops
            logprobs = {
                "tokens": strings,
                "token_logprobs": lps,
                "top_logprobs": tops,
                "text_offset": offsets,
            }
        return {
            "text": text,
            "index": c.index,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }

    async def _sse(
        self,
        req: CompletionRequest,
        choices: list[_Choice],
        head: dict[str, Any],
        memory_field: Any,
        usage_prompt: int,
        arrived: float,
        label: str,
    ) -> AsyncIterator[str]:
        tok = self.rt.tokenizer
        Update = tuple[_Choice, str, int | None, bool]  # choice, text, token index, finished

        async def updates(c: _Choice) -> AsyncIterator[Update]:
            try:
                async for ev in c.gen.stream():
                    if isinstance(ev, TokenEvent):
                        delta = self._on_token(c, ev, arrived, label)
                        yield (c, delta, len(c.tokens) - 1, False)
                        if c.stream.stopped:
                            break
                    elif isinstance(ev, EndEvent):
                        yield (c, self._on_end(c, ev), None, False)
                if c.stream.stopped:
                    yield (c, c.stream.finish(), None, False)
            finally:
                c.gen.cancel()
            yield (c, "", None, True)

        queue: asyncio.Queue[Update] = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            async for update in updates(c):
                await queue.put(update)

        async def merged() -> AsyncIterator[Update]:
            if len(choices) == 1:  # one stream (the common case): no task, no second queue
                async for update in updates(choices[0]):
                    yield update
                return
            done = 0
            while done < len(choices):
                update = await queue.get()
                done += update[3]
                yield update

        tasks = [] if len(choices) == 1 else [asyncio.create_task(pump(c)) for c in choices]
        first = True
        try:
            if req.echo:
                for c in choices:
                    chunk = self._chunk(head, c.index, c.prompt.text, None, None)
                    if first:
                        chunk["memory"] = memory_field
                        first = False
                    yield _event(chunk)
            async for c, delta, token_i, finished in merged():
                if finished:
                    if c.finish_reason == "error":
                        yield _event(
                            {"error": {"message": "generation failed", "type": "server_error",
                                       "param": None, "code": "internal_error"}}
                        )  # fmt: skip
                        continue
                    chunk = self._chunk(head, c.index, "", None, c.finish_reason)
                elif token_i is not None:
                    lp = None
                    if c.want_logprobs:
                        lp = {
                            "tokens": token_strings(tok, [c.tokens[token_i]]),
                            "token_logprobs": [c.logprobs[token_i]],
                            "top_logprobs": [_top_dict(tok, c.tops[token_i])],
                            "text_offset": [c.offsets[token_i]],
                        }
                    chunk = self._chunk(head, c.index, delta, lp, None)
                elif delta:
                    chunk = self._chunk(head, c.index, delta, None, None)
                else:
                    continue
                if first:
                    chunk["memory"] = memory_field
                    first = False
                yield _event(chunk)
            opts = req.stream_options
            if opts is not None and opts.include_usage:
                completion_tokens = sum(len(c.tokens) for c in choices)
                yield _event(
                    {
                        **head,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": usage_prompt,
                            "completion_tokens": completion_tokens,
                            "total_tokens": usage_prompt + completion_tokens,
                        },
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            for c in choices:
                c.gen.cancel()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _chunk(
        head: dict[str, Any],
        index: int,
        text: str,
        logprobs: dict[str, Any] | None,
        finish: str | None,
    ) -> dict[str, Any]:
        return {
            **head,
            "choices": [
                {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
            ],
        }


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _top_dict(tok: Any, alts: list[tuple[int, float]] | None) -> dict[str, float] | None:
    if alts is None:
        return None
    return {
        s: lp for s, (_, lp) in zip(token_strings(tok, [i for i, _ in alts]), alts, strict=True)
    }


async def _cancel_on_disconnect(request: Request, gens: list[Generation]) -> None:
    """Cancel a non-streaming request's sequences if its client goes away."""
    while True:
        await asyncio.sleep(_DISCONNECT_POLL_S)
        if await request.is_disconnected():
            for g in gens:
                g.cancel()
            return
