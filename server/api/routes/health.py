"""Operations: `GET /health` (the process is up), `GET /ready` (model and store open, every
level's blocks verifiable), `GET /metrics` (Prometheus: the server's and the store's figures).

A level whose block had no good copy in any tier, the bank directory included, makes `/ready`
answer 503 `degraded` (requests are still served, on the fallback) until a good copy is read;
`/health` stays 200 and names the levels, since restarting the process would not help.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server import __version__
from server.api.deps import MetricsDep, services_of
from server.api.schemas.health import EngineLoad, HealthResponse, ReadyResponse, StartingResponse

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    services = services_of(request)
    corrupt = {} if services is None else services.memory.corrupt_blocks()
    return HealthResponse(version=__version__, corrupt_blocks=corrupt)


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={
        503: {
            "model": ReadyResponse | StartingResponse,
            "description": "starting (not open yet, or closing), or degraded (blocks fail "
            "verification)",
        }
    },
)
async def ready(request: Request) -> ReadyResponse | JSONResponse:
    services = services_of(request)
    if services is None:
        return JSONResponse(StartingResponse().model_dump(), status_code=503)
    load = services.completions.load()
    corrupt = services.memory.corrupt_blocks()
    body = ReadyResponse(
        status="degraded" if corrupt else "ready",
        model=services.model.name,
        tiers=services.memory.tier_states(),
        engine=EngineLoad(active=load.active, waiting=load.waiting, cancelled=load.cancelled),
        corrupt_blocks=corrupt,
    )
    if corrupt:
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus(request: Request, metrics: MetricsDep) -> Response:
    services = services_of(request)
    extra = [services.store_metrics] if services is not None else []
    return Response(metrics.render(*extra), media_type="text/plain; version=0.0.4; charset=utf-8")
