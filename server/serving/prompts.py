"""Prompts as the engine takes them: text, token ids or a conversation, and what routing reads.

Token ids are exactly those a completion feeds the model, and `/tokenize` returns: a text prompt
gets the BOS the server adds, a conversation is rendered by the anchor's chat template (which
writes its own BOS), and ids given by the client get the BOS a string would get. A conversation
is routed on the text of its user turns: the questions carry the rare names memory is for, while
a system prompt shared by every conversation would pull all of them toward one cluster
(docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.serving.errors import RequestError
from server.tokenizer import AnchorTokenizer

Turn = Mapping[str, Any]  # one chat message: "role", "content" (text) and the template's extras


@dataclass(frozen=True, slots=True)
class PromptInput:
    """One prompt as the engine takes it, and the text the response and the router see."""

    ids: list[int]
    text: str  # what echo returns
    route_text: str  # what routing embeds (chat: the user turns)
    bos: bool  # ids[0] is a BOS the server added (not echoed)


def route_text(turns: Sequence[Turn]) -> str:
    """What a conversation is routed on: its user turns, or everything if it has none."""
    users = [str(t["content"]) for t in turns if t["role"] == "user"]
    return "\n".join(users or [str(t["content"]) for t in turns])


class Prompts:
    """Builds `PromptInput`s with one tokenizer; checks token ids against the vocabulary."""

    def __init__(
        self, tokenizer: AnchorTokenizer, *, vocab_size: int, context_length: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        # Text longer than this cannot fit the context, however it tokenises: refused before it
        # is tokenised (megabytes of it would take seconds). A token stands for at most
        # `max_token_bytes` bytes, so at most that many characters; x4 covers normalisers that
        # shrink text (composing accents).
        self.max_chars = None if context_length is None else (
            context_length * tokenizer.max_token_bytes * 4
        )  # fmt: skip

    def check_length(self, text: str, *, param: str) -> None:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise RequestError(
                f"{param} of {len(text)} characters is longer than the context length of "
                f"{self.max_chars // (4 * self.tokenizer.max_token_bytes)} tokens can hold",
                param=param,
            )

    def text(self, text: str, *, param: str = "prompt") -> PromptInput:
        self.check_length(text, param=param)
        tok = self.tokenizer
        return PromptInput(tok.encode(text), text, text, bos=tok.adds_bos)

    def chat(self, turns: Sequence[Turn], *, add_generation_prompt: bool) -> PromptInput:
        """A conversation rendered by the chat template, which writes the BOS itself (as vLLM)."""
        for i, turn in enumerate(turns):
            self.check_length(str(turn.get("content") or ""), param=f"messages.{i}.content")
        rendered = self.tokenizer.render_chat(
            list(turns), add_generation_prompt=add_generation_prompt
        )
        self.check_length(rendered, param="messages")
        ids = self.tokenizer.encode(rendered, add_bos=False)
        return PromptInput(ids, rendered, route_text(turns), bos=False)

    def check_ids(self, ids: Sequence[int], *, param: str, what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"{what} has token ids outside 0..{self.vocab_size - 1}: {bad[:5]}", param=param
            )

    def tokens(self, ids: Sequence[int], *, index: int) -> PromptInput:
        """A prompt given as token ids, with the BOS a string prompt gets.

        A model whose tokenizer starts prompts with BOS was trained with one before every
        document, and clients that tokenise for
        themselves (lm-evaluation-harness asks `/tokenize` without special tokens) send none:
        without it, the same text would score differently as ids than as a string. Ids that
        already start with the BOS are taken as they are. Either way the BOS is not echoed.
        """
        self.check_ids(ids, param="prompt", what=f"prompt {index}")
        tok = self.tokenizer
        ids = list(ids)
        text = tok.decode(ids)
        if tok.bos_id is None or not tok.adds_bos:
            return PromptInput(ids, text, text, bos=False)
        if not ids or ids[0] != tok.bos_id:
            ids = [tok.bos_id, *ids]
        return PromptInput(ids, text, text, bos=True)

    def of(self, prompt: str | Sequence[int], *, index: int) -> PromptInput:
        """A completion prompt: a string, or a list of token ids."""
        return self.text(prompt) if isinstance(prompt, str) else self.tokens(prompt, index=index)
