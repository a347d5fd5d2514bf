"""The memory endpoints: route a text and read cache residency (any valid key); prefetch a path
and read or change the blocklist (the admin key)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from server.api.deps import AdminDep, PolicyDep, RuntimeDep
from server.api.errors import APIError
from server.api.schemas.common import error_responses
from server.api.schemas.memory import (
    BlockChangeResponse,
    BlocklistEntry,
    BlocklistResponse,
    CacheResponse,
    ClusterRequest,
    PathRequest,
    PrefetchLevel,
    PrefetchResponse,
    RouteRequest,
    RouteResponse,
)
from server.engine.blocklist import BlocklistError
from server.engine.memory import BlockReport, MemoryRequestError
from server.runtime import Runtime

router = APIRouter(prefix="/v1/memory", tags=["memory"])

_ADMIN_ERRORS = error_responses(400, 401, 403, 503)


@router.post("/route", response_model=RouteResponse, responses=error_responses(400, 401, 503))
async def route(req: RouteRequest, policy: PolicyDep, rt: RuntimeDep) -> RouteResponse:
    path, nodes, distances = await rt.resolver.route(req.text)
    return RouteResponse(
        path=list(path),
        node_ids=list(nodes),
        distances=[round(d, 6) for d in distances],
        blocked=rt.blocklist.blocked_levels(nodes),
    )


@router.get("/cache", response_model=CacheResponse, responses=error_responses(401, 503))
async def cache(policy: PolicyDep, rt: RuntimeDep) -> CacheResponse:
    stats = rt.store.ram.stats()
    return CacheResponse(
        resident={str(k): v for k, v in rt.resolver.residency().items()},
        bytes=stats.bytes,
        capacity_bytes=stats.capacity_bytes,
        hits=stats.hits,
        misses=stats.misses,
    )


@router.post("/prefetch", response_model=PrefetchResponse, responses=_ADMIN_ERRORS)
async def prefetch(req: PathRequest, admin: AdminDep, rt: RuntimeDep) -> PrefetchResponse:
    try:
        outcome = await rt.resolver.prefetch(req.path)
    except MemoryRequestError as exc:
        raise APIError(400, str(exc), param="path", code=exc.code) from None
    return PrefetchResponse(
        path=req.path,
        levels=[
            PrefetchLevel.model_validate(
                {**o.as_dict(), "status": "loaded" if isinstance(o, BlockReport) else "skipped"}
            )
            for o in outcome
        ],
    )


@router.get(
    "/blocklist", response_model=BlocklistResponse, responses=error_responses(401, 403, 503)
)
async def blocklist(admin: AdminDep, rt: RuntimeDep) -> BlocklistResponse:
    return BlocklistResponse(
        blocked=[BlocklistEntry(level=lv, node=n) for lv, n in rt.blocklist.entries()]
    )


def _change(rt: Runtime, req: ClusterRequest, *, block: bool) -> BlockChangeResponse:
    try:
        if block:
            changed = rt.blocklist.block(req.level, req.node)
            rt.resolver.evict_blocked()
        else:
            changed = rt.blocklist.unblock(req.level, req.node)
    except BlocklistError as exc:
        raise APIError(400, str(exc), param="node", code="invalid_cluster") from None
    return BlockChangeResponse(
        level=req.level, node=req.node, blocked=block, changed=changed, at=time.time()
    )


@router.post("/block", response_model=BlockChangeResponse, responses=_ADMIN_ERRORS)
async def block(req: ClusterRequest, admin: AdminDep, rt: RuntimeDep) -> BlockChangeResponse:
    return _change(rt, req, block=True)


@router.post("/unblock", response_model=BlockChangeResponse, responses=_ADMIN_ERRORS)
async def unblock(req: ClusterRequest, admin: AdminDep, rt: RuntimeDep) -> BlockChangeResponse:
    return _change(rt, req, block=False)
