"""`/tokenize`, `/detokenize`, `/tokenizer_info`: the tokenizer endpoints as vLLM serves them.

lm-evaluation-harness and other clients that count or build token ids themselves use these
instead of downloading the model's tokenizer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.api.schemas.chat import ChatMessage, turns_of
from server.api.schemas.common import RequestBody


class TokenizeCompletionRequest(RequestBody):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="add the BOS the server adds to prompts")
    return_token_strs: bool = False


class TokenizeChatRequest(RequestBody):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(
        False, description="add a BOS on top of the template's own (the template writes it)"
    )
    return_token_strs: bool = False

    def turns(self) -> list[dict[str, Any]]:
        return turns_of(self.messages)


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The anchor's `tokenizer_config.json`, with the fields clients look for filled in."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    model_max_length: int
    chat_template: str | None

    @classmethod
    def of(cls, config: dict[str, Any], **fields: Any) -> TokenizerInfoResponse:
        return cls.model_validate({**config, **fields})
