"""Shapes every feature shares: the OpenAI error body, usage, and the `memory` extension."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from server.engine.memory import MemoryRequest, Reason, ResolvedMemory
from server.settings import MemoryMode

STRICT = ConfigDict(strict=True, extra="forbid")
INVALID_UNICODE = "invalid_unicode"  # the error type of a string no encoder can take


class RequestBody(BaseModel):
    """A request body: strict, no unknown fields, and every string valid Unicode.

    JSON may spell a lone surrogate (`"\\ud800"`), which Python's parser keeps in the string;
    no tokenizer or encoder can take it, so it is refused here, with where it was, as a 400.
    """

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data, ())
        return data


def _check_unicode(value: Any, where: tuple[str | int, ...]) -> None:
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                at = ".".join(map(str, where)) or "body"
                raise PydanticCustomError(
                    INVALID_UNICODE,
                    "{param} is not valid Unicode: a lone surrogate U+{code} at character {at}",
                    {"param": at, "code": f"{ord(value[exc.start]):04X}", "at": exc.start},
                ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, (*where, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, (*where, i))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI's API writes it."""

    error: ErrorDetail


_ERROR_TEXT = {
    400: "Invalid request: the message names the field",
    401: "Missing or unknown API key",
    403: "The key may not do this",
    404: "No such model or resource",
    413: "Request body too large",
    429: "At capacity: retry after the time in Retry-After",
    500: "Generation failed",
    503: "Starting or shutting down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can answer."""
    return {s: {"model": ErrorResponse, "description": _ERROR_TEXT[s]} for s in statuses}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class MemoryField(BaseModel):
    """The request's `memory` extension (docs/serving.md)."""

    model_config = STRICT

    mode: MemoryMode = "auto"
    path: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="child index per level (i1, ..., iL); replaces routing"
    )
    levels: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="the levels to use; default all"
    )

    def request(self) -> MemoryRequest:
        return MemoryRequest(
            mode=self.mode,
            path=None if self.path is None else tuple(self.path),
            levels=None if self.levels is None else tuple(self.levels),
        )


class MemoryBlockInfo(BaseModel):
    level: int
    node: int
    tier: str | None = Field(description="the tier that served it (ram: the cache); null: none")
    cached: bool
    fetch_ms: float
    corrupt: list[str] = Field(
        default_factory=list,
        description="tiers whose copy failed its sha256 on this read; repaired in the background",
    )


class MemoryDegradedInfo(BaseModel):
    level: int
    reason: Reason
    fallback: Literal["generic", "none"]


class MemoryInfo(BaseModel):
    """The response's `memory` object: which blocks one prompt decoded with, and why not others."""

    mode: MemoryMode
    path: list[int] | None
    blocks: list[MemoryBlockInfo]
    fetch_ms: float
    degraded: list[MemoryDegradedInfo]
    blocked: list[int]

    @classmethod
    def of(cls, memory: ResolvedMemory) -> MemoryInfo:
        return cls.model_validate(memory.as_dict())
