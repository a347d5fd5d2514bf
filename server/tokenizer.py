"""The anchor's tokenizer: a Hugging Face checkpoint's tokenizer files, read by `tokenizers`.

Kept apart from the model, which does no I/O. Token ids come from `tokenizer.json`; BOS and EOS
ids from the checkpoint's config.json (`bos_token_id`, `eos_token_id`), as the model was trained
on them. Whether a prompt starts with BOS is the tokenizer's own rule, as `transformers` applies
it: `add_bos_token` in `tokenizer_config.json` when it says, else whether `tokenizer.json`'s
post-processor adds it (Llama 3's does; Qwen's does not), else (hmem's banks from before either
file said) BOS whenever config.json names one. `tokenizer_config.json`, when present, names the
special tokens and carries the chat
template (`chat_template.jinja` beside it takes precedence, as in `transformers`); an anchor
without it still loads, with no chat template. A tokenizer whose vocabulary does not fit the
model's embedding table is refused, since its ids would index past it, and so is one whose BOS
token is not config.json's, since `transformers` would then prompt the model differently.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from server.chat_template import NO_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError
from server.model.config import AnchorConfig
from server.model.errors import CheckpointError

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "TOKENIZER",
    "TOKENIZER_CONFIG",
    "AnchorTokenizer",
    "ChatTemplateError",
]

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens `transformers` puts in a chat template's context.
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip


class AnchorTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        config: AnchorConfig,
        *,
        tokenizer_config: Mapping[str, Any] | None = None,
        template: ChatTemplate | None = None,
    ) -> None:
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > config.vocab_size:
            raise CheckpointError(
                f"{TOKENIZER} has {size} tokens but the model's vocab_size is {config.vocab_size}"
            )
        self._tok = tokenizer
        self.bos_id = config.bos_token_id
        self.adds_bos = _adds_bos(
            tokenizer, self.bos_id, (tokenizer_config or {}).get("add_bos_token")
        )
        eos = config.eos_token_id
        eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids: frozenset[int] = frozenset(eos_list)
        self.vocab_size = size
        self.config: dict[str, Any] = dict(tokenizer_config or {})
        specials = {
            name: token
            for name in SPECIAL_TOKEN_NAMES
            if (token := _token_text(self.config.get(name), name)) is not None
        }
        named_bos = specials.get("bos_token")
        if named_bos is not None and self.bos_id is not None:
            bos_id = tokenizer.token_to_id(named_bos)
            if bos_id != self.bos_id:
                raise CheckpointError(
                    f"{TOKENIZER_CONFIG} names bos_token {named_bos!r} (id {bos_id}) but "
                    f"config.json's bos_token_id is {self.bos_id}: they must agree"
                )
        self.bos_token: str | None = named_bos or self._token_of(self.bos_id)
        self.eos_token: str | None = specials.get("eos_token") or self._token_of(
            eos_list[0] if eos_list else None
        )
        self._template_context = {**specials}
        for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token)):
            if token is not None:
                self._template_context[name] = token
        self._template = template
        self.chat_template: str | None = None if template is None else template.text

    @classmethod
    def from_dir(
        cls, directory: str | Path, config: AnchorConfig, *, chat_template: str | None = None
    ) -> AnchorTokenizer:
        """The tokenizer of a checkpoint directory; `chat_template` (a template's text) replaces
        the directory's own. A template that does not parse raises `ChatTemplateError`."""
        root = Path(directory)
        path = root / TOKENIZER
        if not path.is_file():
            raise CheckpointError(f"{root} has no {TOKENIZER}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own Exception type
            raise CheckpointError(f"{path} is not a valid tokenizer: {exc}") from exc
        tokenizer_config = _read_tokenizer_config(root / TOKENIZER_CONFIG)
        template = (
            _directory_template(root, tokenizer_config)
            if chat_template is None
            else ChatTemplate(chat_template, origin="the --chat-template file")
        )
        return cls(tok, config, tokenizer_config=tokenizer_config, template=template)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for: its vocabulary entry's own
        bytes (a byte-level entry spells each byte as one character of up to 2 bytes)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max((len(t.encode()) for t in vocab), default=1)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, after the BOS id when the tokenizer starts prompts with one.

        Special tokens written in the text ("<s>") are their ids, as in `transformers`.
        """
        # The batch call: it releases the GIL, so a long text tokenised in a worker thread
        # leaves the event loop running (`encode` holds it throughout).
        ids: list[int] = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self.adds_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self._tok.decode(ids, skip_special_tokens=True)
        return text

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text of a chat, as `apply_chat_template(..., tokenize=False)` renders it.

        The text starts with whatever the template writes (the BOS token, for hmem's anchors):
        encode it with `add_bos=False`. `extra` reaches the template as variables.
        """
        if self._template is None:
            raise ChatTemplateError(NO_CHAT_TEMPLATE)
        return self._template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            context={**self._template_context, **extra},
        )

    def _token_of(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        token: str | None = self._tok.id_to_token(token_id)
        return token


def _token_text(value: object, name: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        content: str = value["content"]
        return content
    raise CheckpointError(f"{TOKENIZER_CONFIG}: {name} must be a string, not {value!r}")


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _directory_template(root: Path, tokenizer_config: Mapping[str, Any]) -> ChatTemplate | None:
    """The checkpoint's own template: `chat_template.jinja`, else tokenizer_config.json's.

    A config may hold a list of named templates; the one named "default" is the chat template.
    """
    jinja_file = root / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(encoding="utf-8"), origin=str(jinja_file))
    text = tokenizer_config.get("chat_template")
    if isinstance(text, list):
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, Mapping)}
        text = named.get("default")
    if text is None:
        return None
    if not isinstance(text, str):
        raise CheckpointError(f"{root / TOKENIZER_CONFIG}: chat_template must be a string")
    return ChatTemplate(text, origin=str(root / TOKENIZER_CONFIG))


def _adds_bos(tokenizer: Tokenizer, bos_id: int | None, flag: object) -> bool:
    """Whether prompts start with BOS: the module docstring's rule."""
    if bos_id is None:
        return False
    if isinstance(flag, bool):
        return flag
    if tokenizer.post_processor is None:
        return True
    return tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
