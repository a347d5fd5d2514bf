"""The memory endpoints: route a text and read cache residency (any valid key); prefetch a path
and read or change the blocklist (the admin key)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from server.api.deps import AdminDep, MemoryDep, PolicyDep
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
from server.engine.memory import BlockReport

router = APIRouter(prefix="/v1/memory", tags=["memory"])

_ADMIN_ERRORS = error_responses(400, 401, 403, 503)


@router.post("/route", response_model=RouteResponse, responses=error_responses(400, 401, 503))
async def route(req: RouteRequest, policy: PolicyDep, memory: MemoryDep) -> RouteResponse:
    r = await memory.route(req.text)
    return RouteResponse(
        path=list(r.path),
        node_ids=list(r.node_ids),
        distances=[round(d, 6) for d in r.distances],
        blocked=r.blocked,
    )


@router.get("/cache", response_model=CacheResponse, responses=error_responses(401, 503))
async def cache(policy: PolicyDep, memory: MemoryDep) -> CacheResponse:
    view = memory.cache()
    return CacheResponse(
        resident={str(k): v for k, v in view.resident.items()},
        bytes=view.bytes,
        capacity_bytes=view.capacity_bytes,
        hits=view.hits,
        misses=view.misses,
    )


@router.post("/prefetch", response_model=PrefetchResponse, responses=_ADMIN_ERRORS)
async def prefetch(req: PathRequest, admin: AdminDep, memory: MemoryDep) -> PrefetchResponse:
    outcome = await memory.prefetch(req.path)
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
async def blocklist(admin: AdminDep, memory: MemoryDep) -> BlocklistResponse:
    return BlocklistResponse(
        blocked=[BlocklistEntry(level=lv, node=n) for lv, n in memory.blocked()]
    )


@router.post("/block", response_model=BlockChangeResponse, responses=_ADMIN_ERRORS)
async def block(req: ClusterRequest, admin: AdminDep, memory: MemoryDep) -> BlockChangeResponse:
    changed = memory.block(req.level, req.node)
    return BlockChangeResponse(
        level=req.level, node=req.node, blocked=True, changed=changed, at=time.time()
    )


@router.post("/unblock", response_model=BlockChangeResponse, responses=_ADMIN_ERRORS)
async def unblock(req: ClusterRequest, admin: AdminDep, memory: MemoryDep) -> BlockChangeResponse:
    changed = memory.unblock(req.level, req.node)
    return BlockChangeResponse(
        level=req.level, node=req.node, blocked=False, changed=changed, at=time.time()
    )
