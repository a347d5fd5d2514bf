"""The anchor's tokenizer: `tokenizer.json` of a Hugging Face checkpoint, read by `tokenizers`.

Kept apart from the model, which does no I/O. Special tokens come from the checkpoint's
config.json (`bos_token_id`, `eos_token_id`); a tokenizer whose vocabulary does not fit the
model's embedding table is refused, since its ids would index past it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from server.model.config import AnchorConfig
from server.model.errors import CheckpointError

TOKENIZER = "tokenizer.json"


class AnchorTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: AnchorConfig) -> None:
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > config.vocab_size:
            raise CheckpointError(
                f"{TOKENIZER} has {size} tokens but the model's vocab_size is {config.vocab_size}"
            )
        self._tok = tokenizer
        self.bos_id = config.bos_token_id
        eos = config.eos_token_id
        self.eos_ids: frozenset[int] = frozenset(
            () if eos is None else (eos,) if isinstance(eos, int) else eos
        )
        self.vocab_size = size

    @classmethod
    def from_dir(cls, directory: str | Path, config: AnchorConfig) -> AnchorTokenizer:
        path = Path(directory) / TOKENIZER
        if not path.is_file():
            raise CheckpointError(f"{Path(directory)} has no {TOKENIZER}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own Exception type
            raise CheckpointError(f"{path} is not a valid tokenizer: {exc}") from exc
        return cls(tok, config)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, after the BOS id when the checkpoint defines one."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self._tok.decode(ids, skip_special_tokens=True)
        return text
