"""`GET /health` and `GET /ready`: liveness and readiness."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class EngineLoad(BaseModel):
    active: int
    waiting: int
    cancelled: int


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    tiers: dict[str, str] = Field(
        description="each tier's circuit breaker: closed, open or half_open"
    )
    engine: EngineLoad


class StartingResponse(BaseModel):
    status: Literal["starting"] = "starting"
