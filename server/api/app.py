"""The FastAPI application: `create_app(settings)` registers routers, error handlers, middleware.

The lifespan opens the `Runtime` (bank, tiers, model, engine; warmed up) before the first request
is accepted, hands the routes its services (`server.serving.Services`), and closes it after the
last. Routes, one module per feature (`server/api/routes/`):
completions, chat, tokenizer (`/tokenize`, `/detokenize`, `/tokenizer_info`), models, health
(`/health`, `/ready`, `/metrics`) and memory (`/v1/memory/*`). Access: `server.api.access`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server import __version__
from server.api.access import Access
from server.api.errors import install
from server.api.middleware import BodyLimit, RequestMetrics
from server.api.routes import chat, completions, health, memory, models, tokenizer
from server.runtime import Runtime
from server.serving.metrics import ServerMetrics
from server.serving.services import Services
from server.settings import Settings

ROUTERS = (completions.router, chat.router, tokenizer.router, models.router, health.router,
           memory.router)  # fmt: skip


def create_app(settings: Settings) -> FastAPI:
    """The app for `settings`; the runtime opens in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await Runtime.open(settings)
        app.state.services = Services.of(rt, metrics)
        try:
            yield
        finally:
            app.state.services = None
            await rt.close()

    app = FastAPI(title="hmem", version=__version__, lifespan=lifespan)
    metrics = ServerMetrics(lambda: s.completions.load() if (s := app.state.services) else None)
    app.state.services = None
    app.state.metrics = metrics
    app.state.access = Access(settings)
    install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_request_bytes))
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less the 422 it documents by default: this server answers 400."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
