"""`GET /health` and `GET /ready`: liveness and readiness."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

_CORRUPT = "level -> blocks whose every copy failed its sha256 (none served; fallback in use)"


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    corrupt_blocks: dict[str, int] = Field(default_factory=dict, description=_CORRUPT)


class EngineLoad(BaseModel):
    active: int
    waiting: int
    cancelled: int


class ReadyResponse(BaseModel):
    status: Literal["ready", "degraded"] = Field(
        "ready", description="degraded (and 503) while some level's blocks fail verification"
    )
    model: str
    tiers: dict[str, str] = Field(
        description="each tier's circuit breaker: closed, open or half_open"
    )
    engine: EngineLoad
    corrupt_blocks: dict[str, int] = Field(default_factory=dict, description=_CORRUPT)


class StartingResponse(BaseModel):
    status: Literal["starting"] = "starting"
