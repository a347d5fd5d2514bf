"""`POST /v1/completions`: OpenAI's legacy completion API, with the `memory` extension."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import CompletionsDep, PolicyDep
from server.api.schemas.common import MemoryInfo, error_responses
from server.api.schemas.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    stops_of,
)
from server.api.streaming import (
    DONE,
    STREAM_DOC,
    Head,
    event_stream,
    failed_choice,
    sse,
    sse_error,
    top_with_sampled,
    unless_disconnected,
    usage,
)
from server.engine.text import Detokenizer, token_strings
from server.serving.completion import Choice, Completion
from server.serving.completions import CompletionService, Sampling

router = APIRouter(tags=["completions"])


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={
        200: {"content": STREAM_DOC, "description": "JSON, or SSE chunks when streaming"},
        **error_responses(400, 401, 403, 404, 413, 429, 500, 503),
    },
)
async def create_completion(
    req: CompletionRequest, request: Request, policy: PolicyDep, service: CompletionsDep
) -> CompletionResponse | StreamingResponse:
    arrived = time.perf_counter()
    job = await service.complete(
        model=req.model,
        prompts=req.prompts(),
        max_tokens=req.max_tokens,
        n=req.n,
        sampling=Sampling(
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            logprobs=req.logprobs,
            echo=req.echo,
            stop=stops_of(req.stop),
            ignore_eos=req.ignore_eos,
        ),
        memory=req.memory.request(),
        policy=policy,
        arrived=arrived,
    )
    memory = [MemoryInfo.of(m) for m in job.memories]
    memory_field = memory[0] if req.single_prompt() else memory
    head = Head.new("cmpl", service.model_name)
    if req.stream:
        return event_stream(_stream(service, req, job, head, memory_field))
    await unless_disconnected(request, job, job.run())
    if (failed := failed_choice(job)) is not None:
        raise failed
    return CompletionResponse(
        **head.fields(),
        choices=[_choice(service.tokenizer, c, req) for c in job.choices],
        usage=usage(job),
        memory=memory_field,
    )


def _choice(tok: Detokenizer, c: Choice, req: CompletionRequest) -> CompletionChoice:
    prefix = c.prompt.text if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        strings = token_strings(tok, [t.id for t in c.tokens])
        offsets = [len(prefix) + o for o in c.stream.token_offsets()]
        lps: list[float | None] = [t.logprob for t in c.tokens]
        tops: list[dict[str, float] | None] = [
            top_with_sampled(tok, t.top, t.id, t.logprob) for t in c.tokens
        ]
        if req.echo:
            # The prompt's own tokens first, less a BOS the server added; the first has no
            # logprob (nothing precedes it).
            p_ids = c.prompt.ids[1:] if c.prompt.bos else c.prompt.ids
            p_lp = c.prompt_logprobs or []
            p_lp = p_lp[1:] if c.prompt.bos else p_lp
            p_strings = token_strings(tok, p_ids)
            p_offsets, at = [], 0
            for s in p_strings:
                p_offsets.append(min(at, len(prefix)))
                at += len(s)
            strings = p_strings + strings
            offsets = p_offsets + offsets
            lps = [lp for lp, _ in p_lp] + lps
            tops = [
                None if lp is None else top_with_sampled(tok, alts, tid, lp)
                for tid, (lp, alts) in zip(p_ids, p_lp, strict=True)
            ] + tops
        logprobs = CompletionLogprobs(
            tokens=strings, token_logprobs=lps, top_logprobs=tops, text_offset=offsets
        )
    return CompletionChoice(
        text=prefix + c.text, index=c.index, logprobs=logprobs, finish_reason=c.finish_reason
    )


def _chunk(
    head: Head,
    index: int,
    text: str,
    *,
    logprobs: CompletionLogprobs | None = None,
    finish_reason: str | None = None,
) -> CompletionResponse:
    # Built without validation: every field comes from the server's own typed values.
    choice = CompletionChoice.model_construct(
        text=text, index=index, logprobs=logprobs, finish_reason=finish_reason
    )
    return CompletionResponse.model_construct(**head.fields(), choices=[choice])


async def _stream(
    service: CompletionService,
    req: CompletionRequest,
    job: Completion,
    head: Head,
    memory_field: Any,
) -> AsyncIterator[str]:
    tok = service.tokenizer
    first = True

    def frame(chunk: CompletionResponse) -> str:
        nonlocal first
        if first:  # the memory object rides on the first chunk only
            first = False
            chunk.memory = memory_field
            return sse(chunk, exclude={"usage"})
        return sse(chunk, exclude={"usage", "memory"})

    try:
        if req.echo:
            for c in job.choices:
                yield frame(_chunk(head, c.index, c.prompt.text))
        async for d in job.stream():
            c = d.choice
            if d.finished:
                if c.finish_reason == "error":
                    yield sse_error(c)
                else:
                    yield frame(_chunk(head, c.index, "", finish_reason=c.finish_reason))
            elif d.token is not None:
                lp = None
                if req.logprobs is not None:
                    t = d.token
                    lp = CompletionLogprobs.model_construct(
                        tokens=token_strings(tok, [t.id]),
                        token_logprobs=[t.logprob],
                        top_logprobs=[top_with_sampled(tok, t.top, t.id, t.logprob)],
                        text_offset=[c.offsets[-1]],
                    )
                yield frame(_chunk(head, c.index, d.text, logprobs=lp))
            elif d.text:
                yield frame(_chunk(head, c.index, d.text))
        opts = req.stream_options
        if opts is not None and opts.include_usage:
            tail = CompletionResponse.model_construct(**head.fields(), choices=[], usage=usage(job))
            yield sse(tail, exclude={"memory"})
        yield DONE
    finally:
        job.cancel()
