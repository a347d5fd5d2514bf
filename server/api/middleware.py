"""Plain ASGI middleware: request counts for `/metrics`, and a cap on request bodies.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`: that wrapper hands the app a copy of
the request's `receive` channel, so the app never hears that its client disconnected, and a
non-streaming generation ran on for a client long gone.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body
from server.serving.metrics import ServerMetrics

MAX_BODY = 4 << 20  # bytes: a request body larger than this is refused (413)


class RequestMetrics:
    """Counts every finished HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            # The router records the matched route in the scope it was given.
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()


class BodyLimit:
    """Refuses a body over `max_bytes` with 413, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(413, f"request body over {self.max_bytes} bytes")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _answer(scope, receive, send, too_large)
                return
        seen = 0

        async def receive_counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large  # FastAPI re-raises HTTPException from body reading
            return message

        await self.app(scope, receive_counted, send)


async def _answer(scope: Scope, receive: Receive, send: Send, exc: HTTPException) -> None:
    response = JSONResponse(error_body(exc.status_code, exc.detail, code="body_too_large"), 413)
    await response(scope, receive, send)
