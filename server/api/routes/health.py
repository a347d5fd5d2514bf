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
from server.api.deps import MetricsDep
from server.api.schemas.health import EngineLoad, HealthResponse, ReadyResponse, StartingResponse
from server.runtime import Runtime

router = APIRouter(tags=["operations"])


def _corrupt(rt: Runtime | None) -> dict[str, int]:
    if rt is None:
        return {}
    return {str(level): len(keys) for level, keys in sorted(rt.store.unrepaired().items()) if keys}


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    return HealthResponse(version=__version__, corrupt_blocks=_corrupt(rt))


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
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse(StartingResponse().model_dump(), status_code=503)
    stats = rt.engine.stats()
    corrupt = _corrupt(rt)
    body = ReadyResponse(
        status="degraded" if corrupt else "ready",
        model=rt.model_name,
        tiers={name: b.state.name.lower() for name, b in rt.store.breakers.items()},
        engine=EngineLoad(active=stats.active, waiting=stats.waiting, cancelled=stats.cancelled),
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
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    extra = [rt.store_metrics.registry] if rt is not None else []
    return Response(metrics.render(*extra), media_type="text/plain; version=0.0.4; charset=utf-8")
