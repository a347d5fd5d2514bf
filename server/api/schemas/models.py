"""`GET /v1/models`: the served model, with its memory bank's shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelMemory(BaseModel):
    type: str
    levels: int
    branching: int
    widths: list[int]
    generic: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hmem"
    context_length: int
    memory: ModelMemory


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
