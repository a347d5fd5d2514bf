"""Block codec: round trips of every memory type, decoding as views, and rejecting bad blobs."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest
import torch
from safetensors.torch import save as save_safetensors

from server.bank import (
    BankBlockCodec,
    BlockFormatError,
    block_nbytes,
    decode_block,
    encode_block,
    write_random_bank,
)
from server.model.memory import FFNBlock, MemoryBlock, MemoryType, memory_type_of
from tests.server.bank.helpers import LORA_TARGETS, data_of, header_of, make_block, raw_blob

INPUTS: dict[str, Callable[[bytes], bytes | bytearray | memoryview]] = {
    "bytes": lambda b: b,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "memoryview-of-bytearray-slice": lambda b: memoryview(bytearray(b"xx" + b))[2:],
}


def assert_blocks_equal(got: MemoryBlock, want: MemoryBlock, dtype: torch.dtype) -> None:
    assert memory_type_of(got) is memory_type_of(want)
    got_t, want_t = got.tensors(), want.tensors()
    assert set(got_t) == set(want_t)
    for name, t in want_t.items():
        assert got_t[name].dtype == dtype
        assert torch.equal(got_t[name], t.to(dtype)), name


def storages(block: MemoryBlock) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in block.tensors().values()}


@pytest.mark.parametrize("memory_type", list(MemoryType))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(INPUTS))
def test_round_trip_views_one_buffer(memory_type: MemoryType, dtype: str, kind: str) -> None:
    block = make_block(memory_type)
    blob = encode_block(block, dtype=dtype)
    decoded = decode_block(INPUTS[kind](blob), memory_type=memory_type, dtype=dtype)
    assert_blocks_equal(decoded, block, getattr(torch, dtype))
    assert len(storages(decoded)) == 1  # every tensor is a view of one buffer


def test_lora_round_trip_keeps_every_target() -> None:
    block = make_block(MemoryType.LORA)
    decoded = decode_block(encode_block(block, dtype="float32"), memory_type=MemoryType.LORA)
    assert sorted(decoded.tensors()) == sorted(
        f"{t}.{ab}" for t in LORA_TARGETS for ab in ("a", "b")
    )


def test_decoding_a_bytearray_does_not_copy_it() -> None:
    buf = bytearray(encode_block(make_block(MemoryType.FFN), dtype="float32"))
    block = decode_block(buf, memory_type=MemoryType.FFN)
    assert isinstance(block, FFNBlock)
    offset = block.gate.data_ptr() - block.gate.untyped_storage().data_ptr()
    buf[offset : offset + 4] = struct.pack("<f", 123.0)
    assert block.gate.flatten()[0].item() == 123.0


def test_a_borrowed_view_is_copied_once_so_the_block_owns_its_memory() -> None:
    block = make_block(MemoryType.KV)
    source = bytearray(encode_block(block, dtype="float32"))
    borrowed = memoryview(source).toreadonly()  # what a tier hands over: not ours to keep
    decoded = decode_block(borrowed, memory_type=MemoryType.KV)
    assert len(storages(decoded)) == 1
    source[:] = bytes(len(source))
    assert_blocks_equal(decoded, block, torch.float32)


def test_a_block_decoded_from_an_lmdb_page_outlives_its_transaction(tmp_path: Path) -> None:
    block = make_block(MemoryType.FFN)
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"k", encode_block(block, dtype="bfloat16"))
        with env.begin(buffers=True) as txn:
            page = txn.get(b"k")
            decoded = decode_block(page, memory_type=MemoryType.FFN, dtype="bfloat16")
        with env.begin(write=True) as txn:  # the pages the view pointed at may be reused
            txn.put(b"k", b"\0" * 64)
    finally:
        env.close()
    assert_blocks_equal(decoded, block, torch.bfloat16)


def test_bank_codec_decodes_every_level_width_and_counts_tensor_bytes(tmp_path: Path) -> None:
    manifest = write_random_bank(tmp_path / "bank", widths=(8, 4))
    codec = BankBlockCodec(manifest)
    for width in (8, 4):
        block = make_block(MemoryType.FFN, width=width)
        decoded = codec.decode(memoryview(encode_block(block, dtype="float32")))
        assert decoded.width == width
        assert codec.nbytes(decoded) == block_nbytes(block) == 3 * 2 * width * 32 * 4


# -- rejection -------------------------------------------------------------------------------


FFN_BLOB = encode_block(make_block(MemoryType.FFN), dtype="float32")


def rejected(
    blob: bytes | bytearray,
    match: str,
    *,
    memory_type: MemoryType = MemoryType.FFN,
    expected: dict[str, tuple[int, ...]] | None = None,
    dtype: str | None = None,
) -> None:
    with pytest.raises(BlockFormatError, match=match):
        decode_block(blob, memory_type=memory_type, expected=expected, dtype=dtype)


def test_truncated_blocks_are_rejected() -> None:
    rejected(FFN_BLOB[:-1], "truncated")
    rejected(FFN_BLOB[:5], "truncated")
    rejected(b"", "truncated")


def test_trailing_bytes_are_rejected() -> None:
    rejected(FFN_BLOB + b"\0", "after its last tensor")


def test_a_header_length_past_the_end_is_rejected() -> None:
    n = len(FFN_BLOB)
    rejected(struct.pack("<Q", n) + FFN_BLOB[8:], "runs past the end")
    rejected(struct.pack("<Q", 2**63) + FFN_BLOB[8:], "exceeds")


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("brace", "not valid JSON"),
        ("dtype", "dtype 'G32'"),
        ("shape", "data_offsets .* needs"),
        ("offset", "data_offsets .* needs"),
        ("name", "missing tensor|unexpected tensors"),
        ("length", "unused bytes|aligned|not valid JSON|after its last tensor"),
    ],
)
def test_flipped_header_bytes_are_rejected(what: str, match: str) -> None:
    header_text = FFN_BLOB[8 : 8 + struct.unpack("<Q", FFN_BLOB[:8])[0]]
    positions = {
        "brace": 8,
        "dtype": 8 + header_text.index(b'"F32"') + 1,
        "shape": 8 + header_text.index(b'"shape":[') + 9,
        "offset": 8 + header_text.index(b'"data_offsets":[') + 16,
        "name": 8 + header_text.index(b'"gate"') + 2,
        "length": 0,
    }
    blob = bytearray(FFN_BLOB)
    blob[positions[what]] ^= 0x01
    rejected(blob, match)


def test_malformed_json_is_rejected() -> None:
    rejected(raw_blob({}, b"")[:8] + b"{nope", "runs past the end")
    rejected(struct.pack("<Q", 5) + b"{nope", "not valid JSON")
    rejected(struct.pack("<Q", 2) + b"[]", "JSON object")


def test_duplicate_names_in_the_header_are_rejected() -> None:
    text = b'{"gate":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},' + (
        b'"gate":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    )
    rejected(struct.pack("<Q", len(text)) + text, "twice")


def test_unknown_and_unsupported_dtypes_are_rejected() -> None:
    header = header_of(FFN_BLOB)
    header["gate"]["dtype"] = "F64"  # type: ignore[index]
    rejected(raw_blob(header, data_of(FFN_BLOB)), "'gate': dtype 'F64' is not one a bank stores")
    header["gate"]["dtype"] = "Q7"  # type: ignore[index]
    rejected(raw_blob(header, data_of(FFN_BLOB)), "dtype 'Q7'")


def test_a_dtype_other_than_the_requested_one_is_rejected() -> None:
    rejected(FFN_BLOB, "dtype F32, expected torch.bfloat16", dtype="bfloat16")


def tiny_ffn_header(offsets: dict[str, list[int]]) -> dict[str, object]:
    shapes = {"gate": [1, 2, 4], "up": [1, 2, 4], "down": [1, 4, 2]}  # 32 bytes each as F32
    return {n: {"dtype": "F32", "shape": shapes[n], "data_offsets": offsets[n]} for n in shapes}


def test_overlapping_offsets_are_rejected() -> None:
    header = tiny_ffn_header({"gate": [0, 32], "up": [16, 48], "down": [48, 80]})
    rejected(raw_blob(header, bytes(80)), "overlaps")


def test_gaps_and_out_of_range_offsets_are_rejected() -> None:
    gap = tiny_ffn_header({"gate": [0, 32], "up": [40, 72], "down": [72, 104]})
    rejected(raw_blob(gap, bytes(104)), "unused bytes")
    past = tiny_ffn_header({"gate": [0, 32], "up": [32, 64], "down": [64, 96]})
    rejected(raw_blob(past, bytes(90)), "past the end")


def test_offsets_that_do_not_match_the_shape_are_rejected() -> None:
    header = tiny_ffn_header({"gate": [0, 36], "up": [36, 68], "down": [68, 100]})
    rejected(raw_blob(header, bytes(100)), "'gate': data_offsets .* needs 32")
    header = tiny_ffn_header({"gate": [32, 0], "up": [32, 64], "down": [64, 96]})
    rejected(raw_blob(header, bytes(96)), r"is not \[begin, end\]")


def test_misaligned_tensors_and_bad_shapes_are_rejected() -> None:
    header = tiny_ffn_header({"gate": [0, 32], "up": [32, 64], "down": [64, 96]})
    rejected(raw_blob(header, bytes(96), pad=False), "aligned|unused")
    header["gate"]["shape"] = [1, True, 4]  # type: ignore[index]
    rejected(raw_blob(header, bytes(96)), "shape")


def test_missing_and_extra_tensors_are_rejected() -> None:
    block = make_block(MemoryType.FFN)
    tensors = block.tensors()
    missing = save_safetensors({"gate": tensors["gate"], "up": tensors["up"]})
    rejected(missing, "missing tensor 'down'")
    extra = save_safetensors({**tensors, "bias": torch.zeros(3)})
    rejected(extra, "unexpected tensors.*bias")
    lora = make_block(MemoryType.LORA).tensors()
    rejected(
        save_safetensors({**lora, "q.c": torch.zeros(2, 2, 2)}), "q.c", memory_type=MemoryType.LORA
    )
    rejected(
        save_safetensors({"q.a": lora["q.a"]}), "missing tensor 'q.b'", memory_type=MemoryType.LORA
    )


def test_shapes_must_match_expected() -> None:
    block = make_block(MemoryType.FFN, width=4)
    expected = {name: tuple(t.shape) for name, t in block.tensors().items()}
    assert isinstance(
        decode_block(FFN_BLOB, memory_type=MemoryType.FFN, expected=expected), FFNBlock
    )
    wider = {**expected, "gate": (2, 8, 32)}
    rejected(FFN_BLOB, r"'gate': shape \[2, 4, 32\], expected \[2, 8, 32\]", expected=wider)
    rejected(FFN_BLOB, "missing tensors", expected={**expected, "extra": (1,)})


def test_a_block_of_another_memory_type_is_rejected() -> None:
    rejected(FFN_BLOB, "holds a ffn memory, expected kv", memory_type=MemoryType.KV)
    header = header_of(FFN_BLOB)
    header["__metadata__"] = {"format": "other"}
    rejected(raw_blob(header, data_of(FFN_BLOB)), "format 'other'")
    header["__metadata__"] = {"format": 1}
    rejected(raw_blob(header, data_of(FFN_BLOB)), "__metadata__")


def test_bank_codec_rejects_widths_and_dims_the_bank_does_not_have(tmp_path: Path) -> None:
    codec = BankBlockCodec(write_random_bank(tmp_path / "bank", widths=(8, 4)))
    with pytest.raises(BlockFormatError, match="width 5 is none of the bank's widths"):
        codec.decode(memoryview(encode_block(make_block(MemoryType.FFN, width=5), dtype="float32")))
    gate = torch.zeros(2, 4, 16)
    wrong_d = FFNBlock(gate, gate.clone(), torch.zeros(2, 16, 4))
    with pytest.raises(BlockFormatError, match="'gate': shape"):
        codec.decode(memoryview(encode_block(wrong_d, dtype="float32")))
    bf16 = encode_block(make_block(MemoryType.FFN, width=4), dtype="bfloat16")
    with pytest.raises(BlockFormatError, match="dtype BF16"):
        codec.decode(memoryview(bf16))
