"""The server's request limits, and the one place each is checked.

`Limits` is the slice of the settings a completion request is measured against: tokens per
sequence (the context the KV cache is sized for), `max_tokens`, prompts and samples per request,
and the engine's slots and queue places. Each rule raises a `RequestError` naming its field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.serving.errors import ContextLengthError, RequestError
from server.settings import Settings


@dataclass(frozen=True, slots=True)
class Limits:
    context_length: int  # tokens per sequence, prompt and completion
    max_tokens: int  # the most a request may ask for (settings.max_tokens_limit)
    max_n: int
    max_prompts: int
    slots: int  # batch slots plus queue places: the most sequences the engine ever holds

    @classmethod
    def of(cls, settings: Settings, *, context_length: int) -> Limits:
        return cls(
            context_length=context_length,
            max_tokens=settings.max_tokens_limit,
            max_n=settings.max_n,
            max_prompts=settings.max_prompts,
            slots=settings.max_batch + settings.max_queue,
        )

    def check_max_tokens(self, asked: int) -> int:
        if not 1 <= asked <= self.max_tokens:
            raise RequestError(
                f"max_tokens must be between 1 and {self.max_tokens}, got {asked}",
                param="max_tokens",
            )
        return asked

    def room(self, prompt_tokens: int) -> int:
        """The most tokens a prompt leaves room for: a default max_tokens (chat, as vLLM)."""
        return max(1, min(self.context_length - prompt_tokens, self.max_tokens))

    def check_counts(self, *, prompts: int, n: int) -> None:
        if n > self.max_n:
            raise RequestError(f"n must be at most {self.max_n}, got {n}", param="n")
        if prompts > self.max_prompts:
            raise RequestError(
                f"at most {self.max_prompts} prompts per request, got {prompts}", param="prompt"
            )
        if prompts * n > self.slots:
            raise RequestError(
                f"{prompts} prompts x n={n} sequences can never fit this server's "
                f"{self.slots} slots and queue places",
                param="n",
            )

    def check_context(self, lengths: Sequence[int], max_tokens: int) -> None:
        """Each prompt (of `lengths` tokens) plus `max_tokens` fits the context."""
        for i, length in enumerate(lengths):
            if not length:
                raise RequestError(f"prompt {i} encodes to no tokens", param="prompt")
            if length + max_tokens > self.context_length:
                raise ContextLengthError(
                    f"prompt {i} is {length} tokens and max_tokens is {max_tokens}: "
                    f"together more than the context length of {self.context_length} tokens",
                    param="prompt" if length >= self.context_length else "max_tokens",
                )
