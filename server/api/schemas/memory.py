"""The memory endpoints: route a text, cache residency, prefetch, and the blocklist."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from server.api.schemas.common import RequestBody


class RouteRequest(RequestBody):
    text: str


class RouteResponse(BaseModel):
    path: list[int]
    node_ids: list[int]
    distances: list[float]
    blocked: list[int]


class CacheResponse(BaseModel):
    resident: dict[str, list[int]] = Field(description="level -> node ids in the RAM cache")
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int


class PathRequest(RequestBody):
    path: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class PrefetchLevel(BaseModel):
    level: int
    status: Literal["loaded", "skipped"]
    node: int | None = None
    tier: str | None = None
    cached: bool | None = None
    fetch_ms: float | None = None
    reason: str | None = None
    fallback: str | None = None
    corrupt: list[str] | None = None


class PrefetchResponse(BaseModel):
    path: list[int]
    levels: list[PrefetchLevel]


class ClusterRequest(RequestBody):
    level: int = Field(ge=1)
    node: int = Field(ge=0)


class BlocklistEntry(BaseModel):
    level: int
    node: int


class BlocklistResponse(BaseModel):
    blocked: list[BlocklistEntry]


class BlockChangeResponse(BaseModel):
    level: int
    node: int
    blocked: bool
    changed: bool
    at: float
