"""The FastAPI application: `create_app(settings)`, its lifespan, and its routes.

The lifespan opens the `Runtime` (bank, tiers, model, engine; warmed up) before the first request
is accepted and closes it after the last. Routes:

- `POST /v1/completions` (OpenAI-compatible, `server.api.completions`), `GET /v1/models`,
  `GET /v1/models/{id}`;
- `GET /health` (the process is up), `GET /ready` (the model and store are open),
  `GET /metrics` (Prometheus: the server's and the store's figures);
- memory: `POST /v1/memory/route`, `GET /v1/memory/cache` (any valid key);
  `POST /v1/memory/prefetch`, `GET /v1/memory/blocklist`, `POST /v1/memory/block`,
  `POST /v1/memory/unblock` (the admin key).

Access: with `api_keys` configured, every `/v1` route needs `Authorization: Bearer KEY` with one
of them (or the admin key); each key carries its memory policy. Admin routes need the admin key
and are refused when none is configured.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.responses import Response

from server import __version__
from server.api.completions import Completions
from server.api.errors import APIError, install, validation_message
from server.api.metrics import ServerMetrics
from server.api.schemas import ClusterRequest, CompletionRequest, PathRequest, RouteRequest
from server.engine.blocklist import BlocklistError
from server.engine.memory import BlockReport, MemoryRequestError
from server.runtime import Runtime
from server.settings import KeyPolicy, Settings

_MAX_BODY = 4 << 20  # bytes: a request body larger than this is refused (413)


class _Access:
    """Bearer-key checks: which policy a request runs under, and who is admin."""

    def __init__(self, settings: Settings) -> None:
        self.keys = dict(settings.api_keys)
        self.admin = None if settings.admin_key is None else settings.admin_key.get_secret_value()

    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    def _is_admin(self, token: str | None) -> bool:
        return (
            token is not None
            and self.admin is not None
            and hmac.compare_digest(token.encode(), self.admin.encode())
        )

    def policy(self, request: Request) -> KeyPolicy | None:
        """The caller's policy (None: unrestricted); 401 without a valid key when keys exist."""
        token = self._bearer(request)
        if self._is_admin(token):
            return None
        if not self.keys:
            return None
        if token is not None:
            for key, policy in self.keys.items():
                if hmac.compare_digest(token.encode(), key.encode()):
                    return policy
        raise APIError(
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def require_admin(self, request: Request) -> None:
        if self.admin is None:
            raise APIError(
                403, "admin endpoints are disabled: no admin key is configured", code="no_admin"
            )
        token = self._bearer(request)
        if token is None:
            raise APIError(
                401,
                "the admin key is required: send 'Authorization: Bearer <admin key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self._is_admin(token):
            raise APIError(403, "this endpoint needs the admin key", code="admin_required")


async def _body(request: Request, model: type[Any]) -> Any:
    """The request body parsed as `model`; malformed JSON or wrong fields are a 400."""
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise APIError(413, f"request body over {_MAX_BODY} bytes", code="body_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors(include_url=False)))
        raise APIError(400, message, param=param, code="invalid_request") from None


def create_app(settings: Settings) -> FastAPI:
    """The app for `settings`; the runtime opens in the lifespan."""
    holder: dict[str, Runtime] = {}
    metrics = ServerMetrics(lambda: holder["rt"].engine.stats() if "rt" in holder else None)
    access = _Access(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await Runtime.open(settings)
        holder["rt"] = rt
        app.state.runtime = rt
        app.state.completions = Completions(rt, metrics)
        try:
            yield
        finally:
            holder.pop("rt", None)
            await rt.close()

    app = FastAPI(title="hmem", version=__version__, lifespan=lifespan)
    app.state.metrics = metrics
    install(app)

    def runtime() -> Runtime:
        rt = holder.get("rt")
        if rt is None:
            raise APIError(503, "the server is starting or stopping", code="not_ready")
        return rt

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    # -- operations -----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        rt = holder.get("rt")
        if rt is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        breakers = {name: b.state for name, b in rt.store.breakers.items()}
        stats = rt.engine.stats()
        return JSONResponse(
            {
                "status": "ready",
                "model": rt.model_name,
                "tiers": breakers,
                "engine": {
                    "active": stats.active,
                    "waiting": stats.waiting,
                    "cancelled": stats.cancelled,
                },
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        rt = holder.get("rt")
        extra = [rt.store_metrics.registry] if rt is not None else []
        return Response(
            metrics.render(*extra), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # -- models ---------------------------------------------------------------------------------

    def model_card(rt: Runtime) -> dict[str, Any]:
        m = rt.bank.manifest
        return {
            "id": rt.model_name,
            "object": "model",
            "created": int(rt.started_at),
            "owned_by": "hmem",
            "context_length": rt.context_length,
            "memory": {
                "type": str(m.memory_type),
                "levels": m.levels,
                "branching": m.branching,
                "widths": list(m.widths),
                "generic": bool(m.generic),
            },
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        access.policy(request)
        return {"object": "list", "data": [model_card(runtime())]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        access.policy(request)
        rt = runtime()
        if model_id != rt.model_name:
            raise APIError(404, f"model {model_id!r} does not exist", code="model_not_found")
        return model_card(rt)

    # -- completions ----------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        policy = access.policy(request)
        req = await _body(request, CompletionRequest)
        runtime()
        handler: Completions = app.state.completions
        return await handler(req, policy, request)

    # -- memory ---------------------------------------------------------------------------------

    @app.post("/v1/memory/route")
    async def route(request: Request) -> dict[str, Any]:
        access.policy(request)
        body: RouteRequest = await _body(request, RouteRequest)
        rt = runtime()
        path, nodes, distances = await rt.resolver.route(body.text)
        return {
            "path": list(path),
            "node_ids": list(nodes),
            "distances": [round(d, 6) for d in distances],
            "blocked": rt.blocklist.blocked_levels(nodes),
        }

    @app.get("/v1/memory/cache")
    async def cache(request: Request) -> dict[str, Any]:
        access.policy(request)
        rt = runtime()
        stats = rt.store.ram.stats()
        return {
            "resident": {str(k): v for k, v in rt.resolver.residency().items()},
            "bytes": stats.bytes,
            "capacity_bytes": stats.capacity_bytes,
            "hits": stats.hits,
            "misses": stats.misses,
        }

    @app.post("/v1/memory/prefetch")
    async def prefetch(request: Request) -> dict[str, Any]:
        access.require_admin(request)
        body: PathRequest = await _body(request, PathRequest)
        rt = runtime()
        try:
            outcome = await rt.resolver.prefetch(body.path)
        except MemoryRequestError as exc:
            raise APIError(400, str(exc), param="path", code=exc.code) from None
        return {
            "path": body.path,
            "levels": [
                {**o.as_dict(), "status": "loaded"}
                if isinstance(o, BlockReport)
                else {**o.as_dict(), "status": "skipped"}
                for o in outcome
            ],
        }

    @app.get("/v1/memory/blocklist")
    async def blocklist(request: Request) -> dict[str, Any]:
        access.require_admin(request)
        rt = runtime()
        return {"blocked": [{"level": lv, "node": n} for lv, n in rt.blocklist.entries()]}

    async def change(request: Request, *, block: bool) -> dict[str, Any]:
        access.require_admin(request)
        body: ClusterRequest = await _body(request, ClusterRequest)
        rt = runtime()
        try:
            if block:
                changed = rt.blocklist.block(body.level, body.node)
                rt.resolver.evict_blocked()
            else:
                changed = rt.blocklist.unblock(body.level, body.node)
        except BlocklistError as exc:
            raise APIError(400, str(exc), param="node", code="invalid_cluster") from None
        return {
            "level": body.level,
            "node": body.node,
            "blocked": block,
            "changed": changed,
            "at": time.time(),
        }

    @app.post("/v1/memory/block")
    async def block(request: Request) -> dict[str, Any]:
        return await change(request, block=True)

    @app.post("/v1/memory/unblock")
    async def unblock(request: Request) -> dict[str, Any]:
        return await change(request, block=False)

    return app
