"""Incremental detokenisation: generated token ids to streamed text deltas, cut at stop strings.

A streamed delta can never be taken back, so `TextStream` holds back the tail of the text that
may still change or vanish:

- a trailing U+FFFD: a byte-level tokenizer decodes an incomplete UTF-8 sequence to the
  replacement character, and the next token may complete it into a real character;
- a trailing proper prefix of a stop string: the next tokens may complete the stop, and no part
  of a stop string is ever returned.

The text is re-decoded from all ids at every token: O(n) per token, which is cheap for the few
thousand tokens a completion has, and right for any tokenizer whose decoding is prefix-stable
(decode(a + b) starts with decode(a), up to a trailing U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["REPLACEMENT", "Detokenizer", "TextStream", "token_strings"]

REPLACEMENT = "\ufffd"


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def token_strings(tokenizer: Detokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own string, decoded alone (a partial UTF-8 byte reads as U+FFFD)."""
    return [tokenizer.decode([i]) for i in ids]


class TextStream:
    """Turns generated token ids into text deltas, holding back what is not yet final.

    `prefix_ids` (the prompt) are decoded as context for tokenizers whose decoding depends on
    what precedes, but are never part of `text`.
    """

    def __init__(
        self, tokenizer: Detokenizer, stop: Sequence[str] = (), *, prefix_ids: Sequence[int] = ()
    ) -> None:
        # Stop strings come checked (non-empty, bounded) by `SamplingParams`, their one rule.
        self._tok = tokenizer
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._prefix = list(prefix_ids)
        self._prefix_len = len(tokenizer.decode(self._prefix)) if self._prefix else 0
        self._ids: list[int] = []
        self._starts: list[int] = []  # per token: length of the final text before it
        self._full = ""  # decode of every id so far, less the prefix's text
        self._emitted = 0  # characters of _full returned so far
        self._stopped = False
        self._finished = False

    @property
    def stopped(self) -> bool:
        """A stop string was found: the text ends before it and nothing more is emitted."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._full[: self._emitted]

    @property
    def ids(self) -> tuple[int, ...]:
        """The tokens taken in: every token pushed up to and including the one that stopped."""
        return tuple(self._ids)

    def push(self, token_id: int) -> str:
        """Takes the next generated token; returns the text that became final (may be "")."""
        if self._finished:
            raise RuntimeError("push after finish")
        if self._stopped:
            return ""
        self._starts.append(len(self._full.rstrip(REPLACEMENT)))
        self._ids.append(token_id)
        self._full = self._decode()

        cut = self._find_stop()
        if cut is not None:
            self._stopped = True
            self._full = self._full[:cut]
            return self._emit(cut)
        settled = self._full.rstrip(REPLACEMENT)
        return self._emit(len(settled) - self._stop_prefix_len(settled))

    def finish(self) -> str:
        """Ends the stream: returns everything held back (U+FFFD and stop prefixes as they are)."""
        if self._finished:
            return ""
        self._finished = True
        return self._emit(len(self._full))

    def token_offsets(self) -> list[int]:
        """For each token taken in, the offset in `text` where its contribution starts.

        A token that completes a multi-byte character starts where that character does, and
        offsets past a stop cut are clipped to the end of the text.
        """
        end = len(self.text)
        return [min(start, end) for start in self._starts]

    def _decode(self) -> str:
        if not self._prefix:
            return self._tok.decode(self._ids)
        return self._tok.decode(self._prefix + self._ids)[self._prefix_len :]

    def _find_stop(self) -> int | None:
        """Where the first stop string starts, if one overlaps the text not yet emitted."""
        if not self._stop:
            return None
        # Held back text never contains a whole stop, so a stop can start at most
        # max_stop - 1 characters before the emitted boundary.
        start = max(0, self._emitted - self._max_stop + 1)
        found = [i for s in self._stop if (i := self._full.find(s, start)) >= 0]
        # Emitted text cannot be taken back, even from a tokenizer that is not prefix-stable.
        return max(min(found), self._emitted) if found else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self._full[self._emitted : upto]
        self._emitted = upto
        return delta
