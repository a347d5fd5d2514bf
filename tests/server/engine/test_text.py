"""Incremental detokenisation with the project's real byte-level tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer

from server.engine.errors import RequestError
from server.engine.sampling import SamplingParams
from server.engine.text import REPLACEMENT, TextStream, token_strings
from server.training.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return byte_tokenizer()


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=False).ids
    return ids


def stream_all(stream: TextStream, ids: Sequence[int]) -> list[str]:
    return [stream.push(i) for i in ids]


@pytest.mark.parametrize("text", ["café", "日本語です", "ok 😀👍🏽!", "é日😀"])
def test_multibyte_characters_are_never_emitted_half(tok: Tokenizer, text: str) -> None:
    ids = ids_of(tok, text)
    assert len(ids) > len(text)  # characters really are split across tokens
    stream = TextStream(tok)
    deltas = [*stream_all(stream, ids), stream.finish()]
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) == text
    assert stream.text == text
    assert not stream.stopped


def test_a_stop_split_across_tokens_is_cut_and_never_emitted(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["日本"])
    deltas = stream_all(stream, ids_of(tok, "abc日本def"))
    assert "".join(deltas) == "abc"
    assert stream.stopped
    assert stream.text == "abc"
    assert stream.push(ids_of(tok, "x")[0]) == ""
    assert stream.finish() == ""
    assert stream.text == "abc"


def test_text_before_a_stop_is_emitted_as_it_comes(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["\n\n"])
    deltas = stream_all(stream, ids_of(tok, "ab\n\ncd"))
    assert deltas[:4] == ["a", "b", "", ""]
    assert stream.stopped
    assert stream.text == "ab"


def test_a_held_prefix_that_is_no_stop_is_emitted_later(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["END"])
    deltas = stream_all(stream, ids_of(tok, "xENtENEND!"))
    # "EN" waits for a "D" that does not come; in "ENEND" the second "EN" is the stop's start
    assert deltas[:5] == ["x", "", "", "ENt", ""]
    assert "".join(deltas) == "xENtEN"
    assert stream.stopped


def test_the_first_stop_in_the_text_wins(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["cd", "bc"])
    assert "".join(stream_all(stream, ids_of(tok, "abcd"))) == "a"
    assert stream.text == "a"


def test_a_stop_at_the_start_leaves_no_text(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["é"])
    assert "".join(stream_all(stream, ids_of(tok, "éa"))) == ""
    assert stream.stopped
    assert stream.text == ""


def test_finish_flushes_what_was_held_back(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["STOP"])
    assert "".join(stream_all(stream, ids_of(tok, "go ST"))) == "go "
    assert stream.finish() == "ST"
    assert stream.text == "go ST"
    assert stream.finish() == ""


def test_finish_emits_an_incomplete_character_as_is(tok: Tokenizer) -> None:
    stream = TextStream(tok)
    assert stream_all(stream, ids_of(tok, "a日")[:2]) == ["a", ""]
    assert stream.finish() == REPLACEMENT
    assert stream.text == "a" + REPLACEMENT


def test_prefix_ids_are_context_not_text(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["!"], prefix_ids=ids_of(tok, "prompt: "))
    deltas = stream_all(stream, ids_of(tok, "日本!"))
    assert "".join(deltas) == "日本"
    assert stream.text == "日本"
    assert stream.token_offsets() == [0, 0, 0, 1, 1, 1, 2]


def test_token_offsets_are_monotone_and_start_each_tokens_text(tok: Tokenizer) -> None:
    ids = ids_of(tok, "aé日b")
    stream = TextStream(tok)
    stream_all(stream, ids)
    stream.finish()
    offsets = stream.token_offsets()
    # a | é (2 bytes) | 日 (3 bytes) | b: a byte inside a character points at its start
    assert offsets == [0, 1, 1, 2, 2, 2, 3]
    assert offsets == sorted(offsets)
    assert all(0 <= o <= len(stream.text) for o in offsets)


def test_token_offsets_are_clipped_at_a_stop(tok: Tokenizer) -> None:
    stream = TextStream(tok, stop=["cd"])
    stream_all(stream, ids_of(tok, "abcdef"))
    assert stream.text == "ab"
    assert stream.ids == tuple(ids_of(tok, "abcd"))  # nothing is taken in after the stop
    assert stream.token_offsets() == [0, 1, 2, 2]


def test_token_strings_are_each_tokens_own_text(tok: Tokenizer) -> None:
    assert token_strings(tok, ids_of(tok, "hi!")) == ["h", "i", "!"]
    assert token_strings(tok, ids_of(tok, "é")) == [REPLACEMENT, REPLACEMENT]


def test_empty_stop_strings_are_refused_naming_the_field() -> None:
    # The rule lives in SamplingParams alone; TextStream takes the stops it let through.
    with pytest.raises(RequestError, match="stop") as err:
        SamplingParams(max_tokens=1, stop=("ok", ""))
    assert err.value.param == "stop"
