"""The cluster's ingress: the OpenAI API on the outside, engine replicas behind it.

Every request is forwarded as it came (`bridge.Forward`) to one engine replica, which answers it
with the single-machine app, so the API is the same code on one machine and on many. The
ingress adds three things:

- **Placement.** Completions and chat are routed here (`placer.Placer`): the path of the first
  prompt goes on the request, for the request router (`router.ResidencyRouter`), and every
  prompt's path goes along as a hint for the replica.
- **Failover.** A replica that dies (or is unreachable) before the client was sent any token
  costs the client nothing: the request goes again to another replica, up to `retries` times.
  Until then nothing is sent: a non-streaming response is whole before it goes out, and a
  stream's frames are held until one carries a token (a chat stream's opening role frame does
  not), then passed through. A replica that answers 429 (its queue is full) has the request
  tried on another one first. After the first token, a lost replica ends the stream with an
  error event, since the tokens sent cannot be taken back.
- **Many replicas as one server.** `/metrics` adds, per replica, what its RAM cache holds and
  its hit rate, then every replica's own metrics, fetched from each and relabelled
  (`server.cluster.metrics`); the blocklist changes (`/v1/memory/block`, `unblock`) go to
  every replica.

This module imports no Ray: the handle it is given only needs `.options(stream=True)` and a
`serve_http.remote(fwd)` that yields frames, so the tests can run it over replicas in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from server import __version__
from server.api.errors import APIError, error_body
from server.cluster.bridge import Forward, Frame, header
from server.cluster.metrics import ClusterMetrics
from server.cluster.placer import Placer

log = logging.getLogger(__name__)

# The response header naming the engine replica that served the request.
REPLICA_HEADER = "x-hmem-replica"
BROADCAST = ("/v1/memory/block", "/v1/memory/unblock")
_HOP_HEADERS = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"}


class ReplicaLostError(Exception):
    """The replica serving an attempt died or could not be reached."""


class EngineHandle(Protocol):
    """What the ingress needs of Serve's handle to the engine replicas."""

    def options(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class IngressOptions:
    retries: int = 3  # attempts after the first, each on a replica not tried yet when possible
    metrics_timeout_s: float = 3.0  # each replica's /metrics, in the fan-out
    reach_timeout_s: float = 10.0  # a request pinned to a replica (x-hmem-replica) reaching it


def _is_token_event(event: bytes) -> bool:
    """An SSE event that carries generated output (or ends the stream): past it, no retry."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            return True
        if not isinstance(chunk, dict) or "error" in chunk:
            return True
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason") is not None or choice.get("text"):
                return True
            if (choice.get("delta") or {}).get("content"):
                return True
    return False


class _Attempt:
    """One try at a request on one replica: its frames, read up to where it can be committed."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.frames = stream.__aiter__()
        self.replica: str | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.held: list[bytes] = []
        self.done = False

    async def next_frame(self) -> Frame | None:
        try:
            return await self.frames.__anext__()  # type: ignore[no-any-return]
        except StopAsyncIteration:
            self.done = True
            return None
        except Exception as exc:
            if _is_replica_lost(exc):
                raise ReplicaLostError(str(exc)) from exc
            raise

    async def reach(self) -> None:
        """Read the first frame, the replica's id: the call has reached its replica."""
        frame = await self.next_frame()
        if frame is None or frame[0] != "replica":
            raise ReplicaLostError("the replica ended the response before naming itself")
        self.replica = frame[1]

    async def open(self) -> None:
        """Read the replica id and the response start, then hold body frames until committed.

        Committed: a response that is not an event stream is read whole; an event stream is
        read until a frame carries a token. Raises `ReplicaLostError` before then.
        """
        while (frame := await self.next_frame()) is not None:
            if frame[0] == "replica":
                self.replica = frame[1]
            elif frame[0] == "start":
                self.status, self.headers = frame[1], frame[2]
                break
        if self.done:
            raise ReplicaLostError("the replica ended the response before starting it")
        streaming = (header(self.headers, b"content-type") or b"").startswith(b"text/event-stream")
        pending = b""
        while (frame := await self.next_frame()) is not None:
            self.held.append(frame[1])
            if not streaming:
                continue
            pending += frame[1]
            *events, pending = pending.split(b"\n\n")
            if any(_is_token_event(e) for e in events):
                return

    def cancel(self) -> None:
        cancel = getattr(self.stream, "cancel", None)
        if cancel is not None:
            cancel()


def _is_replica_lost(exc: BaseException) -> bool:
    """A Ray error that means the replica is gone or unreachable (not an error of the app)."""
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover - Ray is there whenever a handle is
        return False
    return isinstance(exc, RayActorError | ActorUnavailableError)


class Ingress:
    """Forwards the API to engine replicas through `engine` (a Serve handle, or alike)."""

    def __init__(
        self,
        placer: Placer,
        engine: EngineHandle,
        reports: Callable[[], dict[str, dict[str, Any]]],
        *,
        options: IngressOptions | None = None,
        observe: Callable[[str, Any], None] | None = None,
        decision: Callable[[str], Any] | None = None,
    ) -> None:
        self.placer = placer
        self.engine = engine
        self.reports = reports
        self.options = options or IngressOptions()
        self.observe = observe
        self.decision = decision
        self.metrics = ClusterMetrics(reports)

    def _call(self, fwd: Forward) -> _Attempt:
        stream = self.engine.options(stream=True).serve_http.remote(fwd)
        return _Attempt(stream)

    # -- forwarding -----------------------------------------------------------------------------

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        url_path = request.url.path
        pinned = request.headers.get(REPLICA_HEADER)
        if pinned is not None:
            return await self._pinned(request, body, pinned)
        placement = await self.placer.place(url_path, body)
        fwd = Forward(
            method=request.method,
            path=url_path,
            query=request.url.query.encode("latin-1"),
            headers=[(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_HEADERS],
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
            route=placement.route,
            subtrees=self.placer.subtrees(placement.route),
            hints=placement.hints,
            fingerprint=self.placer.fingerprint,
        )
        avoid: set[str] = set()
        overloaded: _Attempt | None = None
        for attempt_no in range(self.options.retries + 1):
            sent = replace(fwd, avoid=frozenset(avoid), attempt=uuid.uuid4().hex)
            attempt = self._call(sent)
            try:
                await attempt.open()
            except ReplicaLostError as exc:
                attempt.cancel()
                if attempt.replica is not None:
                    avoid.add(attempt.replica)
                log.warning("replica %s lost a request before its first token (%s); "
                            "trying again", attempt.replica, exc)  # fmt: skip
                self.metrics.retries.labels("replica_lost").inc()
                await asyncio.sleep(min(0.05 * 2**attempt_no, 1.0))
                continue
            except BaseException:
                attempt.cancel()  # the client left (or the app failed): stop the replica's work
                raise
            self._placed(sent, attempt)
            if attempt.status == 429 and attempt_no < self.options.retries:
                # This replica's queue is full; another may have room. Its answer is kept in
                # case none has.
                attempt.cancel()
                overloaded = attempt
                if attempt.replica is not None:
                    avoid.add(attempt.replica)
                if len(avoid) < len(self.reports()):
                    self.metrics.retries.labels("overloaded").inc()
                    continue
            return self._respond(url_path, attempt)
        if overloaded is not None:
            return self._respond(url_path, overloaded)
        self.metrics.requests.labels(url_path, "503").inc()
        message = (
            f"no engine replica could serve the request after {self.options.retries + 1} "
            "attempts (replicas lost); try again"
        )
        error = APIError(503, message, code="replicas_unavailable", headers={"Retry-After": "1"})
        return error.response()

    async def _pinned(self, request: Request, body: bytes, rid: str) -> Response:
        """A request the client sent to one replica by its id (`x-hmem-replica`, as responses
        name it): there or nowhere, so that e.g. `/v1/memory/cache` can be read per replica."""
        live = sorted(self.reports())
        if rid not in live:
            message = f"no live replica {rid!r} ({REPLICA_HEADER}); live: {live}"
            return APIError(404, message, code="unknown_replica").response()
        attempt = self._call(self._targeted(request, body, rid))
        try:
            await asyncio.wait_for(attempt.reach(), timeout=self.options.reach_timeout_s)
            await attempt.open()
        except (ReplicaLostError, TimeoutError):
            attempt.cancel()
            self.metrics.requests.labels(request.url.path, "503").inc()
            message = f"replica {rid!r} did not answer; try again"
            return APIError(503, message, code="replica_unavailable").response()
        except BaseException:
            attempt.cancel()
            raise
        return self._respond(request.url.path, attempt)

    def _placed(self, fwd: Forward, attempt: _Attempt) -> None:
        if fwd.route is None or attempt.replica is None:
            return
        if self.observe is not None:
            self.observe(attempt.replica, fwd.route)
        decided = self.decision(fwd.attempt) if self.decision is not None else None
        if decided is None:
            return
        how, preferred = decided
        self.metrics.placed.labels(
            how if how == "any" or attempt.replica in preferred or how == "spill" else "other"
        ).inc()

    def _respond(self, url_path: str, attempt: _Attempt) -> Response:
        self.metrics.requests.labels(url_path, str(attempt.status)).inc()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in attempt.headers}
        headers.pop("content-length", None)
        if attempt.replica is not None:
            headers[REPLICA_HEADER] = attempt.replica
        if attempt.done:
            return Response(b"".join(attempt.held), status_code=attempt.status, headers=headers)
        return StreamingResponse(self._rest(attempt), status_code=attempt.status, headers=headers)

    async def _rest(self, attempt: _Attempt) -> AsyncIterator[bytes]:
        try:
            for chunk in attempt.held:
                yield chunk
            while (frame := await attempt.next_frame()) is not None:
                yield frame[1]
        except ReplicaLostError as exc:
            self.metrics.lost.inc()
            log.warning("replica %s was lost after tokens were sent: %s", attempt.replica, exc)
            message = (
                "the engine replica serving this stream was lost; the tokens sent stand, the "
                "rest was not generated"
            )
            error = error_body(500, message, code="replica_lost")
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            attempt.cancel()

    # -- many replicas as one -------------------------------------------------------------------

    async def _one(self, fwd: Forward, timeout_s: float) -> tuple[int, bytes] | None:
        """The whole response of `fwd` (targeted), or None when its replica did not answer."""
        attempt = self._call(fwd)
        try:
            await asyncio.wait_for(attempt.open(), timeout=timeout_s)
            while not attempt.done:
                frame = await asyncio.wait_for(attempt.next_frame(), timeout=timeout_s)
                if frame is not None:
                    attempt.held.append(frame[1])
        except (ReplicaLostError, TimeoutError):
            return None
        finally:
            attempt.cancel()
        return attempt.status, b"".join(attempt.held)

    def _targeted(self, request: Request, body: bytes, replica: str) -> Forward:
        return Forward(
            method=request.method,
            path=request.url.path,
            query=request.url.query.encode("latin-1"),
            headers=[(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_HEADERS],
            body=body,
            target=replica,
        )

    async def _each(
        self, request: Request, body: bytes, timeout_s: float
    ) -> list[tuple[str, tuple[int, bytes] | None]]:
        """`request` sent to every live replica, one after another, and their answers.

        One after another: calls made while serving one HTTP request share its Serve request
        id, and Serve's router matches a chosen replica to a waiting call by that id, so calls
        made at once could be handed each other's replicas.
        """
        out = []
        for rid in sorted(self.reports()):
            out.append((rid, await self._one(self._targeted(request, body, rid), timeout_s)))
        return out

    async def metrics_text(self, request: Request) -> bytes:
        answers = await self._each(request, b"", self.options.metrics_timeout_s)
        texts = {
            rid: got[1].decode("utf-8") for rid, got in answers if got is not None and got[0] == 200
        }
        return self.metrics.render(texts)

    async def broadcast(self, request: Request) -> Response:
        """The same admin change on every replica; the first refusal, or the first answer."""
        body = await request.body()
        if not self.reports():
            return await self.forward(request)
        answers = await self._each(request, body, 30.0)
        missed = [rid for rid, got in answers if got is None]
        got = [a for _, a in answers if a is not None]
        if missed or not got:
            message = (
                f"replicas {missed} did not answer; the change reached {len(got)} of "
                f"{len(answers)}: send it again"
            )
            return APIError(503, message, code="replicas_unavailable").response()
        status, content = next((a for a in got if a[0] >= 400), got[0])
        return Response(content, status_code=status, media_type="application/json")


def create_ingress_app(
    ingress: Ingress, ready: Callable[[], Awaitable[None]] | None = None
) -> FastAPI:
    """The ingress's HTTP app: every path forwarded, `/metrics` and the broadcasts its own."""
    app = FastAPI(
        title="hmem cluster",
        version=__version__,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ingress = ingress

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if ready is not None:
            await ready()
        return Response(
            await ingress.metrics_text(request),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    async def change_blocklist(request: Request) -> Response:
        if ready is not None:
            await ready()
        return await ingress.broadcast(request)

    for path in BROADCAST:
        app.add_api_route(path, change_blocklist, methods=["POST"], include_in_schema=False)

    @app.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"],
        include_in_schema=False,
    )
    async def forward(request: Request, path: str) -> Response:
        started = time.perf_counter()
        response = await ingress.forward(request)
        log.debug("%s %s placed in %.1f ms", request.method, request.url.path,
                  (time.perf_counter() - started) * 1e3)  # fmt: skip
        return response

    return app


def routing_executor() -> ThreadPoolExecutor:
    """Where the ingress embeds prompts with MiniLM: off its event loop."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="hmem-route")


__all__ = [
    "BROADCAST",
    "REPLICA_HEADER",
    "ClusterMetrics",
    "Ingress",
    "IngressOptions",
    "ReplicaLostError",
    "create_ingress_app",
    "routing_executor",
]
