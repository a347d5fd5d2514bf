"""Request bodies of the HTTP API, validated strictly: a wrong type is a 400, never coerced.

`CompletionRequest` is OpenAI's legacy completion request plus the `memory` extension of
`docs/serving.md`. Fields OpenAI defines that this server cannot honour (penalties, `logit_bias`,
`suffix`, `best_of` other than `n`) are accepted only at their neutral values and refused
otherwise, so a client never silently gets something other than what it asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.settings import MemoryMode

_STRICT = ConfigDict(strict=True, extra="forbid")


class MemoryField(BaseModel):
    model_config = _STRICT

    mode: MemoryMode = "auto"
    path: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="child index per level (i1, ..., iL); replaces routing"
    )
    levels: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="the levels to use; default all"
    )


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    prompt: Prompt
    max_tokens: int | None = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="generate max_tokens even past EOS (vLLM's)")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    best_of: int | None = None
    memory: MemoryField = Field(default_factory=lambda: MemoryField.model_validate({}))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a token-id prompt is empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        return self

    def single_prompt(self) -> bool:
        """One prompt (a string or one list of token ids), not a list of prompts."""
        p: Any = self.prompt
        return isinstance(p, str) or all(isinstance(x, int) for x in p)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: strings, or lists of token ids."""
        p: Any = self.prompt
        if isinstance(p, str):
            return [p]
        if self.single_prompt():
            return [list(p)]
        return list(p)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class RouteRequest(BaseModel):
    model_config = _STRICT

    text: str


class PathRequest(BaseModel):
    model_config = _STRICT

    path: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class ClusterRequest(BaseModel):
    model_config = _STRICT

    level: int = Field(ge=1)
    node: int = Field(ge=0)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"] | None
