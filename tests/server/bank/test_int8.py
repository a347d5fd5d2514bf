"""int8 banks: FFN blocks stored as int8 weights with float32 scales, and float blocks unchanged.

An int8 block decodes to values within half a quantization step of the float block it was made
from; its size figures (`payload_bytes`, `fetch_bytes`, `bank_bytes`) are its exact tensor bytes;
anything but int8 weights with float32 scales of the right shapes is refused by name; and a
float block is the same bytes it always was (pinned sha256s, and the committed demo bank).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from server.bank import (
    Bank,
    BankBlockCodec,
    BankFormatError,
    BlockFormatError,
    block_nbytes,
    decode_block,
    encode_block,
    load_manifest,
    write_random_bank,
)
from server.bank.layout import block_shapes, payload_bytes
from server.bank.shapes import SHAPES
from server.bank.synthetic import random_block_bytes
from server.defaults import DEMO_BANK
from server.model.memory import FFN_SCALES, FFNBlock, MemoryType, dequantize_block, quantize_block
from tests.server.bank.helpers import (
    TINY_MODEL,
    assert_within_half_a_step,
    header_of,
    make_block,
    tensor_bytes,
)

L, D = TINY_MODEL.n_layers, TINY_MODEL.d_model
INT8_META = {"format": "hmem-block", "memory_type": "ffn", "codec": "2"}


# -- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_an_int8_block_round_trips_within_half_a_scale_step_as_views_of_one_buffer(
    source_dtype: torch.dtype,
) -> None:
    source = make_block(MemoryType.FFN, width=8)
    assert isinstance(source, FFNBlock)
    source = FFNBlock(
        source.gate.to(source_dtype), source.up.to(source_dtype), source.down.to(source_dtype)
    )
    blob = encode_block(source, dtype="int8")

    header = header_of(blob)
    assert header["__metadata__"] == INT8_META
    dtypes = {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}  # type: ignore[index]
    assert dtypes == {"gate": "I8", "up": "I8", "down": "I8", **dict.fromkeys(FFN_SCALES, "F32")}

    for buf in (blob, bytearray(blob), memoryview(blob)):
        block = decode_block(buf, memory_type=MemoryType.FFN, dtype="int8")
        assert isinstance(block, FFNBlock)
        assert block.quantized
        assert {t.untyped_storage().data_ptr() for t in block.tensors().values()} == {
            block.gate.untyped_storage().data_ptr()
        }
        assert_within_half_a_step(block, source)
    # Quantizing is what the model's `quantize_block` does, bit for bit.
    expected = quantize_block(source)
    for name, t in expected.tensors().items():
        assert torch.equal(block.tensors()[name], t), name
    assert block_nbytes(block) == tensor_bytes(blob) == 3 * L * 8 * D + 3 * L * 8 * 4


def test_an_int8_block_encodes_as_it_is_and_a_float_bank_dequantizes_it() -> None:
    quantized = quantize_block(make_block(MemoryType.FFN))
    blob = encode_block(quantized, dtype="int8")
    assert blob == encode_block(make_block(MemoryType.FFN), dtype="int8")
    as_float = decode_block(encode_block(quantized, dtype="bfloat16"), memory_type=MemoryType.FFN)
    want = dequantize_block(quantized, torch.bfloat16)
    for name, t in want.tensors().items():
        assert torch.equal(as_float.tensors()[name], t), name


def test_only_ffn_memories_are_stored_in_int8() -> None:
    for memory_type in (MemoryType.LORA, MemoryType.KV):
        with pytest.raises(BlockFormatError, match="int8 storage holds ffn memories only"):
            encode_block(make_block(memory_type), dtype="int8")


# -- float blocks keep their bytes ---------------------------------------------------------------


# sha256s of float blocks as hmem wrote them before int8 banks: a float bank's bytes never change.
PINNED = {
    "float32": "5b4eb28b23656c66ea2148bf3bdc8c371d3e8b9708cc6fc8bcdd9798c556a736",
    "bfloat16": "358efa75459300a9847d9489fda3cbbcaac1677b92fc90d1431c8b7c200cb46c",
    "float16": "50d7d2a3674060c22fb7dc988d6d2026b8e1d3e000b01be630ed7ffebcebaaa5",
}
PINNED_SMALL = {  # `hmem bank generate --shape small`, seed 0, bf16: (level, node) -> sha256
    (1, 0): "5556a65c4228b426bdea24205b60c216ff31e1461c43fe446d391e9da07a968e",
    (4, 255): "7914da82a8bf84034e3f66e2f4f574c1e8d43d1875f84dd57f44c9d132ad188b",
}


@pytest.mark.parametrize("dtype", list(PINNED))
def test_float_blocks_are_the_bytes_they_always_were(dtype: str) -> None:
    blob = encode_block(make_block(MemoryType.FFN), dtype=dtype)
    assert hashlib.sha256(blob).hexdigest() == PINNED[dtype]
    assert "codec" not in header_of(blob)["__metadata__"]  # type: ignore[operator]


def test_generated_bf16_blocks_are_the_bytes_they_always_were() -> None:
    for (level, node), sha in PINNED_SMALL.items():
        assert random_block_bytes(SHAPES["small"], level, node, 0)[1] == sha


def test_the_demo_banks_blocks_encode_to_their_committed_bytes() -> None:
    bank = Bank.open(DEMO_BANK)
    assert bank.manifest.dtype == "float32"
    for key in bank.block_keys():
        block = bank.read_block(key)
        assert encode_block(block, dtype="float32") == bytes(bank.block_bytes(key)), key


# -- size figures --------------------------------------------------------------------------------


def test_int8_sizes_count_the_scales_and_equal_the_encoded_tensor_bytes(tmp_path: Path) -> None:
    manifest = write_random_bank(tmp_path / "bank", levels=3, widths=(8, 4, 2), dtype="int8")
    assert manifest.block_shapes(2) == {
        "gate": (L, 4, D), "up": (L, 4, D), "down": (L, D, 4),
        "gate.scale": (L, 4), "up.scale": (L, 4), "down.scale": (L, 4),
    }  # fmt: skip
    bank = Bank.open(tmp_path / "bank", require_anchor=False)
    codec = BankBlockCodec(manifest)
    for level, r in ((1, 8), (2, 4), (3, 2)):
        per_block = 3 * L * r * D + 3 * L * r * 4  # int8 weights, float32 scales
        assert payload_bytes(manifest.block_shapes(level), "int8") == per_block
        assert manifest.fetch_bytes([level]) == per_block
        for key in bank.block_keys(level)[:3]:
            blob = bytes(bank.block_bytes(key))
            assert tensor_bytes(blob) == per_block
            assert codec.nbytes(codec.decode(memoryview(blob))) == per_block
    assert manifest.bank_bytes() == sum(
        4**level * 3 * L * r * (D + 4) for level, r in ((1, 8), (2, 4), (3, 2))
    )
    # The float figures are what they were.
    floats = block_shapes(MemoryType.FFN, TINY_MODEL, width=8)
    assert payload_bytes(floats, "bfloat16") == 3 * L * 8 * D * 2


def test_an_int8_bank_reads_verifies_and_holds_the_random_blocks_quantized(
    tmp_path: Path,
) -> None:
    write_random_bank(tmp_path / "f32", levels=2, widths=(8, 4), seed=3)
    write_random_bank(tmp_path / "i8", levels=2, widths=(8, 4), seed=3, dtype="int8")
    floats = Bank.open(tmp_path / "f32", require_anchor=False)
    ints = Bank.open(tmp_path / "i8", require_anchor=False)
    ints.verify()
    assert ints.manifest.model_dump(exclude={"dtype", "blocks", "generic"}) == (
        floats.manifest.model_dump(exclude={"dtype", "blocks", "generic"})
    )
    for key in floats.block_keys():
        source, block = floats.read_block(key), ints.read_block(key)
        assert isinstance(source, FFNBlock)
        assert isinstance(block, FFNBlock)
        assert_within_half_a_step(block, source)
    generic = ints.generic(1)
    assert isinstance(generic, FFNBlock)
    assert generic.quantized


def test_an_int8_lora_or_kv_bank_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(BankFormatError, match="dtype: int8 storage is for ffn memories only"):
        write_random_bank(
            tmp_path / "lora", memory_type=MemoryType.LORA, lora_targets=["q"], dtype="int8"
        )
    with pytest.raises(BankFormatError, match="not kv"):
        write_random_bank(tmp_path / "kv", memory_type=MemoryType.KV, dtype="int8")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="int8 storage is for ffn memories only"):
        block_shapes(MemoryType.KV, TINY_MODEL, width=4, dtype="int8")


def test_a_float_banks_manifest_reads_exactly_as_before() -> None:
    text = (DEMO_BANK / "manifest.json").read_text()
    manifest = load_manifest(DEMO_BANK)
    assert manifest.to_json() == text
    assert json.loads(text)["version"] == 1
    assert all("scale" not in name for name in manifest.block_shapes(1))


# -- rejection -----------------------------------------------------------------------------------


def int8_tensors(width: int = 4) -> dict[str, torch.Tensor]:
    return dict(quantize_block(make_block(MemoryType.FFN, width=width)).tensors())


def blob_of(tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    return save_safetensors(tensors, metadata={**INT8_META, **meta})


def rejected(blob: bytes, match: str, *, dtype: str | None = "int8", **kw: object) -> None:
    with pytest.raises(BlockFormatError, match=match):
        decode_block(blob, memory_type=MemoryType.FFN, dtype=dtype, **kw)  # type: ignore[arg-type]


def test_a_bank_of_one_dtype_refuses_blocks_of_the_other() -> None:
    int8 = encode_block(make_block(MemoryType.FFN), dtype="int8")
    bf16 = encode_block(make_block(MemoryType.FFN), dtype="bfloat16")
    rejected(
        int8,
        r"tensor '(gate|up|down)': dtype I8 \(an int8 block\), expected torch.bfloat16",
        dtype="bfloat16",
    )
    rejected(bf16, r"tensor '(gate|up|down)': dtype BF16, expected int8")
    codec = BankBlockCodec(load_manifest(DEMO_BANK))  # a float32 bank
    with pytest.raises(BlockFormatError, match="dtype I8"):
        codec.decode(memoryview(int8))


def test_an_int8_block_must_hold_int8_weights_and_float32_scales() -> None:
    t = int8_tensors()
    rejected(
        blob_of({**t, "gate.scale": t["gate.scale"].bfloat16()}),
        r"'gate.scale': dtype BF16, but an int8 block stores it as F32 \(block mixes dtypes\)",
    )
    rejected(
        blob_of({**t, "up": t["up"].float()}), "'up': dtype F32, but an int8 block stores it as I8"
    )
    rejected(blob_of({**t, "down": t["down"].bfloat16()}), "'down': dtype BF16", dtype=None)
    no_scale = {n: v for n, v in t.items() if n != "down.scale"}
    rejected(blob_of(no_scale), r"int8 block is missing tensors \['down.scale'\]")
    rejected(blob_of(no_scale), r"missing tensors \['down.scale'\]", dtype=None)
    # int8 weights in a block not marked as the int8 codec, and an unknown codec.
    unmarked = save_safetensors(t, metadata={"format": "hmem-block", "memory_type": "ffn"})
    rejected(unmarked, "dtype I8 in a block not marked int8", dtype=None)
    rejected(unmarked, "expected int8")
    rejected(blob_of(t, codec="3"), "block codec '3' is not one this hmem reads")
    rejected(save_safetensors(t), "not marked int8", dtype=None)
    with pytest.raises(BlockFormatError, match="an int8 block holds an ffn memory, not a kv"):
        decode_block(blob_of(t, memory_type="kv"), memory_type=MemoryType.KV)


def test_scales_of_the_wrong_shape_are_refused_by_name(tmp_path: Path) -> None:
    t = int8_tensors(width=4)
    wide = {**t, "up.scale": torch.ones(L, 5)}
    rejected(
        blob_of(wide), r"scale 'up.scale': torch.float32 \[2, 5\], expected floats of \[2, 4\]"
    )
    expected = {n: tuple(v.shape) for n, v in t.items()}
    rejected(blob_of(wide), r"'up.scale': shape \[2, 5\], expected \[2, 4\]", expected=expected)
    codec = BankBlockCodec(write_random_bank(tmp_path / "bank", widths=(8, 4), dtype="int8"))
    assert codec.decode(memoryview(blob_of(t))).width == 4
    flat = {**t, "gate.scale": torch.ones(L * 4)}
    with pytest.raises(BlockFormatError, match=r"'gate\.scale'"):
        codec.decode(memoryview(blob_of(flat)))
