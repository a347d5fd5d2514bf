"""What the completion and chat routes share over HTTP: SSE framing, disconnects, usage, logprobs.

A non-streaming request's sequences are cancelled the moment its client goes away: the ASGI
server reports the disconnect as the next message on the request's `receive` channel once the
body has been read, so one task waits on it (no polling). A streaming response notices when its
next write fails, and closing its generator cancels the sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.api.errors import APIError
from server.api.schemas.common import Usage
from server.engine.sampling import TopLogprobs
from server.engine.text import Detokenizer, token_strings
from server.serving.completion import Choice, Completion

T = TypeVar("T")

# Each server-sent event, as OpenAPI 3.1 has an event stream's schema describe one event: its
# data is a JSON chunk (the route's response model), an error object, or `[DONE]` at the end.
STREAM_DOC = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {
                "data": {"type": "string", "contentMediaType": "application/json"},
                "event": {"type": "string"},
            },
            "required": ["data"],
        }
    }
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Head:
    """The fields every response and chunk of one request repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Head:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}


def usage(job: Completion) -> Usage:
    done = job.completion_tokens
    return Usage(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=done,
        total_tokens=job.prompt_tokens + done,
    )


def failed_choice(job: Completion) -> APIError | None:
    """A non-streaming request whose sequence failed is answered 500 with the reason."""
    if (c := job.failed()) is not None:
        return APIError(500, f"generation failed: {c.error}", code="generation_failed")
    return None


def sse(body: BaseModel, *, exclude: set[str] | None = None) -> str:
    return f"data: {body.model_dump_json(exclude=exclude)}\n\n"


def sse_error(c: Choice) -> str:
    """One streamed choice failed: an error event naming it; the other choices go on."""
    body = APIError(500, f"generation failed: {c.error}", code="generation_failed").body()
    body["error"]["index"] = c.index
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, job: Completion, work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel the job's sequences."""
    watcher = asyncio.create_task(_disconnected(request))
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({watcher, task}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            job.cancel()  # its sequences end at the next step, and `work` with them
        return await task
    finally:
        job.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def top_with_sampled(
    tok: Detokenizer, top: TopLogprobs | None, token: int, logprob: float
) -> dict[str, float]:
    """The legacy API's top_logprobs at one position: the top-k plus the sampled token (vLLM)."""
    alts = list(top or [])
    if all(i != token for i, _ in alts):
        alts.append((token, logprob))
    strings = token_strings(tok, [i for i, _ in alts])
    return {s: lp for s, (_, lp) in zip(strings, alts, strict=True)}
