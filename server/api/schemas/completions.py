"""`POST /v1/completions`: OpenAI's legacy completion request and response, plus `memory`.

Fields OpenAI defines that this server cannot honour (penalties, `logit_bias`, `suffix`,
`best_of` other than `n`) are accepted only at their neutral values and refused otherwise, so a
client never silently gets something other than what it asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema, field_validator, model_validator

from server.api.schemas.common import (
    MemoryField,
    MemoryInfo,
    RequestBody,
    StreamOptions,
    Usage,
)
from server.engine.sampling import MAX_LOGPROBS, MAX_STOP
from server.serving.completion import ChoiceEnd

Prompt = str | list[str] | list[int] | list[list[int]]
# Documented here, checked once, in `SamplingParams` (a 400 naming `stop`).
Stop = (
    str
    | Annotated[
        list[str],
        WithJsonSchema(
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}
        ),
    ]
    | None
)


def stops_of(v: Stop) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


class NeutralOnly(RequestBody):
    """OpenAI's sampling fields this server accepts only at their neutral values."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _neutral(self) -> Any:
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self


class CompletionRequest(NeutralOnly):
    model: str | None = None
    prompt: Prompt
    max_tokens: int | None = 16
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stop: Stop = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="generate max_tokens even past EOS (vLLM's)")
    suffix: str | None = None
    best_of: int | None = None
    memory: MemoryField = Field(default_factory=lambda: MemoryField.model_validate({}))

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
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        if self.stream and self.logprobs is not None and self.echo:
            raise ValueError("echo with logprobs is not supported when streaming")
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


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


FinishReason = ChoiceEnd | None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    memory: MemoryInfo | list[MemoryInfo] | None = Field(
        None, description="per prompt: an object for one prompt, a list for a list of prompts"
    )
