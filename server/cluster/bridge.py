"""An HTTP request carried from the ingress to an engine replica, and its response carried back.

The ingress does not re-implement the API: it forwards the client's request, as bytes, to the
replica it chose (`Forward`), and the replica runs it through the very app `hmem serve` runs
(`serve_asgi`), so validation, errors, auth, streaming and the `memory` extension are the same
code on one machine and on many. The response comes back as a stream of `Frame`s: the replica's
id first (so a retry can avoid it), then the ASGI response start and body chunks.

`Forward` also carries what the ingress computed: the path of the request's first prompt (which
the request router ranks replicas by, `server.cluster.router`) and every prompt's path
(`hints`), which the replica's resolver takes instead of routing the same text again, when the
ingress routed with the same bank build (`fingerprint`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.engine.memory import route_hints

Path = tuple[int, ...]
# (level, node id) of each memory level of a path, level 1 first: what the router ranks by.
Route = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Forward:
    """One HTTP request for a replica, and how to place it."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    route: Route | None = None  # None: any replica (no memory, or not a generation)
    subtrees: int = 0  # subtrees at the route's first level (for balanced homes); 0: unknown
    hints: Mapping[str, Path] = field(default_factory=dict)  # route text -> path
    fingerprint: str | None = None  # the bank build the hints were routed with
    target: str | None = None  # this replica and no other (the metrics fan-out, broadcasts)
    avoid: frozenset[str] = frozenset()  # replicas that failed this request already
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)


# ("replica", id) | ("start", status, headers) | ("body", bytes)
Frame = tuple[Any, ...]


async def serve_asgi(
    app: Any, fwd: Forward, *, replica: str, trust_hints: bool
) -> AsyncIterator[Frame]:
    """Run `fwd` through the ASGI `app`; its replica id, response start and body, as frames.

    When the consumer stops early (the client left, or the ingress gave up), the app sees the
    client disconnect, as it would over HTTP, and its generation is cancelled.
    """
    yield ("replica", replica)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": fwd.method,
        "scheme": "http",
        "path": fwd.path,
        "raw_path": fwd.path.encode("latin-1"),
        "query_string": fwd.query,
        "root_path": "",
        "headers": fwd.headers,
        "client": fwd.client,
        "server": ("hmem-replica", 0),
    }
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    left = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": fwd.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    token = route_hints.set(dict(fwd.hints) if trust_hints else {})
    try:
        task = asyncio.create_task(run())
    finally:
        route_hints.reset(token)
    try:
        while (message := await out.get()) is not None:
            if message["type"] == "http.response.start":
                yield ("start", message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and (body := message.get("body", b"")):
                yield ("body", bytes(body))
        await task  # the app's own exception, if it raised one
    finally:
        left.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            task.cancel()


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), if any."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
