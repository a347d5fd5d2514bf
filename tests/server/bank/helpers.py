"""Helpers for bank tests: random blocks of every memory type, and hand-made safetensors blobs."""

from __future__ import annotations

import json
import struct

import torch

from server.bank import TINY_MODEL, ModelShape, block_shapes
from server.bank.random_bank import random_block
from server.model.memory import MemoryBlock, MemoryType

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
