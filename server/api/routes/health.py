"""Operations: `GET /health` (the process is up), `GET /ready` (model and store open),
`GET /metrics` (Prometheus: the server's and the store's figures)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server import __version__
from server.api.deps import MetricsDep
from server.api.schemas.health import EngineLoad, HealthResponse, ReadyResponse, StartingResponse
from server.runtime import Runtime

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    return HealthResponse(version=__version__)


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": StartingResponse, "description": "Not open yet, or closing"}},
)
async def ready(request: Request) -> ReadyResponse | JSONResponse:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse(StartingResponse().model_dump(), status_code=503)
    stats = rt.engine.stats()
    return ReadyResponse(
        model=rt.model_name,
        tiers={name: b.state.name.lower() for name, b in rt.store.breakers.items()},
        engine=EngineLoad(active=stats.active, waiting=stats.waiting, cancelled=stats.cancelled),
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus(request: Request, metrics: MetricsDep) -> Response:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    extra = [rt.store_metrics.registry] if rt is not None else []
    return Response(metrics.render(*extra), media_type="text/plain; version=0.0.4; charset=utf-8")
