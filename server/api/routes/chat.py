"""`POST /v1/chat/completions`: OpenAI's chat API over the anchor's chat template, with `memory`.

The conversation is rendered by the anchor's chat template into one prompt (which writes its own
BOS), and routed on the text of its user turns (`server.serving.prompts`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import CompletionsDep, PolicyDep
from server.api.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
)
from server.api.schemas.common import MemoryInfo, error_responses
from server.api.schemas.completions import stops_of
from server.api.streaming import (
    DONE,
    STREAM_DOC,
    Head,
    event_stream,
    failed_choice,
    sse,
    sse_error,
    unless_disconnected,
    usage,
)
from server.engine.text import Detokenizer, token_strings
from server.serving.completion import Completion, TokenInfo
from server.serving.completions import Sampling

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        200: {"content": STREAM_DOC, "description": "JSON, or SSE chunks when streaming"},
        **error_responses(400, 401, 403, 404, 413, 429, 500, 503),
    },
)
async def create_chat_completion(
    req: ChatCompletionRequest, request: Request, policy: PolicyDep, service: CompletionsDep
) -> ChatCompletionResponse | StreamingResponse:
    arrived = time.perf_counter()
    job = await service.chat(
        model=req.model,
        turns=req.turns(),
        add_generation_prompt=req.add_generation_prompt,
        max_tokens=req.asked_max_tokens(),
        n=req.n,
        sampling=Sampling(
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            stop=stops_of(req.stop),
            ignore_eos=req.ignore_eos,
        ),
        memory=req.memory.request(),
        policy=policy,
        arrived=arrived,
    )
    memory = MemoryInfo.of(job.memories[0])
    head = Head.new("chatcmpl", service.model_name)
    if req.stream:
        return event_stream(_stream(service.tokenizer, req, job, head, memory))
    await unless_disconnected(request, job, job.run())
    if (failed := failed_choice(job)) is not None:
        raise failed
    tok = service.tokenizer
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=ChoiceLogprobs(content=[_logprob(tok, t) for t in c.tokens])
            if req.logprobs
            else None,
            finish_reason=c.finish_reason,
        )
        for c in job.choices
    ]
    return ChatCompletionResponse(**head.fields(), choices=choices, usage=usage(job), memory=memory)


def _entry(token: str, logprob: float) -> TopLogprob:
    return TopLogprob.model_construct(
        token=token, logprob=logprob, bytes=list(token.encode("utf-8"))
    )


def _logprob(tok: Detokenizer, t: TokenInfo) -> TokenLogprob:
    """OpenAI's chat logprob entry: the sampled token, and the top-k alternatives at its place."""
    alts = t.top or []
    strings = token_strings(tok, [t.id, *(i for i, _ in alts)])
    return TokenLogprob.model_construct(
        token=strings[0],
        logprob=t.logprob,
        bytes=list(strings[0].encode("utf-8")),
        top_logprobs=[_entry(s, lp) for s, (_, lp) in zip(strings[1:], alts, strict=True)],
    )


def _chunk(
    head: Head,
    index: int,
    delta: ChatDelta,
    *,
    logprobs: ChoiceLogprobs | None = None,
    finish_reason: str | None = None,
) -> ChatCompletionChunk:
    # Built without validation: every field comes from the server's own typed values.
    choice = ChatChunkChoice.model_construct(
        index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
    )
    return ChatCompletionChunk.model_construct(**head.fields(), choices=[choice])


async def _stream(
    tok: Detokenizer,
    req: ChatCompletionRequest,
    job: Completion,
    head: Head,
    memory: MemoryInfo,
) -> AsyncIterator[str]:
    try:
        # Each choice opens with the assistant's role; the first chunk carries the memory object.
        for c in job.choices:
            chunk = _chunk(head, c.index, ChatDelta(role="assistant", content=""))
            if c.index == 0:
                chunk.memory = memory
                yield sse(chunk, exclude={"usage"})
            else:
                yield sse(chunk, exclude={"usage", "memory"})
        async for d in job.stream():
            c = d.choice
            if d.finished:
                if c.finish_reason == "error":
                    yield sse_error(c)
                    continue
                chunk = _chunk(head, c.index, ChatDelta(), finish_reason=c.finish_reason)
            elif d.token is not None:
                logprobs = None
                if req.logprobs:
                    logprobs = ChoiceLogprobs.model_construct(content=[_logprob(tok, d.token)])
                chunk = _chunk(head, c.index, ChatDelta(content=d.text), logprobs=logprobs)
            elif d.text:
                chunk = _chunk(head, c.index, ChatDelta(content=d.text))
            else:
                continue
            yield sse(chunk, exclude={"usage", "memory"})
        opts = req.stream_options
        if opts is not None and opts.include_usage:
            tail = ChatCompletionChunk.model_construct(
                **head.fields(), choices=[], usage=usage(job)
            )
            yield sse(tail, exclude={"memory"})
        yield DONE
    finally:
        job.cancel()
