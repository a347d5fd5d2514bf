"""Helpers for bank tests: random blocks of every memory type, hand-made safetensors blobs, and
the checks of int8 blocks."""

from __future__ import annotations

import json
import struct

import torch

from server.bank import TINY_MODEL, ModelShape, block_shapes
from server.bank.random_bank import random_block
from server.model.memory import FFNBlock, MemoryBlock, MemoryType, dequantize_block

LORA_TARGETS = ["q", "v", "o", "down"]


def targets_for(memory_type: MemoryType) -> list[str] | None:
    return LORA_TARGETS if memory_type is MemoryType.LORA else None


def make_block(
    memory_type: MemoryType, *, width: int = 4, model: ModelShape = TINY_MODEL, seed: int = 0
) -> MemoryBlock:
    shapes = block_shapes(memory_type, model, width=width, lora_targets=targets_for(memory_type))
    return random_block(memory_type, shapes, generator=torch.Generator().manual_seed(seed))


def raw_blob(header: dict[str, object], data: bytes, *, pad: bool = True) -> bytes:
    """A safetensors blob with exactly this header (padded to 8 bytes) and data."""
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def header_of(blob: bytes) -> dict[str, object]:
    n = struct.unpack("<Q", blob[:8])[0]
    header: dict[str, object] = json.loads(blob[8 : 8 + n])
    return header


def data_of(blob: bytes) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    return blob[8 + n :]


def tensor_bytes(blob: bytes) -> int:
    """Bytes of tensor data in a safetensors blob: all of it less its 8-byte length and header."""
    return len(blob) - 8 - int.from_bytes(blob[:8], "little")


def assert_within_half_a_step(block: FFNBlock, source: FFNBlock) -> None:
    """Every dequantized value is within scale/2 of the source's (per neuron, per matrix), give
    or take float32's rounding of `q * scale`."""
    assert block.scales is not None
    gate_s, up_s, down_s = block.scales
    back = dequantize_block(block, torch.float32)
    assert isinstance(back, FFNBlock)
    for got, want, half in (
        (back.gate, source.gate, gate_s[:, :, None] / 2),  # [L, r, 1]: a scale per row r
        (back.up, source.up, up_s[:, :, None] / 2),
        (back.down, source.down, down_s[:, None, :] / 2),  # [L, 1, r]: a scale per column r
    ):
        want32 = want.float()
        err = (got - want32).abs()
        assert bool((err <= half + 2**-20 * want32.abs()).all()), float((err - half).max())
