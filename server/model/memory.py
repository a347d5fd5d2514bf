"""Memory blocks as tensors: the three memory types of the paper and their tensor layout.

A block is the memory of one cluster at one level, for every memory layer of the anchor. Its
tensors are stacked over layers (first dimension `n_layers`), so a block is a handful of
contiguous tensors that the codec can view straight out of the bytes a tier returned.

| type | tensors (names as stored) | shapes |
| --- | --- | --- |
| `ffn`  | `gate`, `up`, `down` | `[L, r, d]`, `[L, r, d]`, `[L, d, r]` |
| `lora` | `{target}.a`, `{target}.b` for each target | `[L, r, in]`, `[L, out, r]` |
| `kv`   | `k`, `v` | `[L, n_kv_heads, r, head_dim]` each |

FFN-memories add `r` neurons to every layer's SwiGLU: `down · (silu(gate · x) * (up · x))` is
added to the FFN output. LoRA-memories add `b · (a · x)` to a projection's output (`q`, `k`,
`v`, `o` of attention, `gate`, `up`, `down` of the FFN). KV-memories are `r` learned key/value
pairs per layer and KV head that every query attends to (no causal mask, no positions); the
result is added to the attention output.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from server.model.errors import MemoryFormatError

__all__ = [
    "LORA_TARGETS",
    "FFNBlock",
    "KVBlock",
    "LoRABlock",
    "MemoryBlock",
    "MemoryFormatError",
    "MemoryType",
    "block_from_tensors",
    "memory_type_of",
    "zeros_like_block",
]

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class MemoryType(enum.StrEnum):
    FFN = "ffn"
    LORA = "lora"
    KV = "kv"


@dataclass(frozen=True, slots=True)
class FFNBlock:
    gate: Tensor  # [L, r, d]
    up: Tensor  # [L, r, d]
    down: Tensor  # [L, d, r]

    @property
    def width(self) -> int:
        return int(self.gate.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        return {"gate": self.gate, "up": self.up, "down": self.down}


@dataclass(frozen=True, slots=True)
class LoRABlock:
    a: Mapping[str, Tensor]  # target -> [L, r, in]
    b: Mapping[str, Tensor]  # target -> [L, out, r]

    @property
    def width(self) -> int:
        return int(next(iter(self.a.values())).shape[1])

    def tensors(self) -> dict[str, Tensor]:
        out = {f"{t}.a": w for t, w in self.a.items()}
        out.update({f"{t}.b": w for t, w in self.b.items()})
        return out


@dataclass(frozen=True, slots=True)
class KVBlock:
    k: Tensor  # [L, n_kv_heads, r, head_dim]
    v: Tensor  # [L, n_kv_heads, r, head_dim]

    @property
    def width(self) -> int:
        return int(self.k.shape[2])

    def tensors(self) -> dict[str, Tensor]:
        return {"k": self.k, "v": self.v}


MemoryBlock = FFNBlock | LoRABlock | KVBlock


def memory_type_of(block: MemoryBlock) -> MemoryType:
    if isinstance(block, FFNBlock):
        return MemoryType.FFN
    if isinstance(block, LoRABlock):
        return MemoryType.LORA
    return MemoryType.KV


def _need(tensors: Mapping[str, Tensor], name: str, ndim: int) -> Tensor:
    if name not in tensors:
        raise MemoryFormatError(f"block is missing tensor {name!r}")
    t = tensors[name]
    if t.ndim != ndim:
        raise MemoryFormatError(f"tensor {name!r} has {t.ndim} dims, expected {ndim}")
    return t


def block_from_tensors(memory_type: MemoryType, tensors: Mapping[str, Tensor]) -> MemoryBlock:
    """Assemble a block from named tensors, checking names and that the shapes agree."""
    if memory_type is MemoryType.FFN:
        unknown = set(tensors) - {"gate", "up", "down"}
        gate, up, down = (_need(tensors, n, 3) for n in ("gate", "up", "down"))
        L, r, d = gate.shape
        if up.shape != gate.shape or down.shape != (L, d, r):
            raise MemoryFormatError(
                f"ffn block shapes disagree: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                f"down {tuple(down.shape)} (expected down {(L, d, r)})"
            )
        block: MemoryBlock = FFNBlock(gate, up, down)
    elif memory_type is MemoryType.LORA:
        targets = sorted({name.rsplit(".", 1)[0] for name in tensors})
        unknown = {
            n
            for n in tensors
            if n.rsplit(".", 1)[0] not in LORA_TARGETS or not n.endswith((".a", ".b"))
        }
        if unknown:
            raise MemoryFormatError(f"unexpected tensors in a lora block: {sorted(unknown)}")
        if not targets:
            raise MemoryFormatError("lora block holds no tensors")
        a = {t: _need(tensors, f"{t}.a", 3) for t in targets if t in LORA_TARGETS}
        b = {t: _need(tensors, f"{t}.b", 3) for t in targets if t in LORA_TARGETS}
        ranks = {w.shape[1] for w in a.values()} | {w.shape[2] for w in b.values()}
        layers = {w.shape[0] for w in [*a.values(), *b.values()]}
        if len(ranks) != 1 or len(layers) != 1:
            raise MemoryFormatError(f"lora block ranks {sorted(ranks)} or layers disagree")
        block = LoRABlock(a, b)
    else:
        unknown = set(tensors) - {"k", "v"}
        k, v = _need(tensors, "k", 4), _need(tensors, "v", 4)
        if k.shape != v.shape:
            raise MemoryFormatError(
                f"kv block shapes disagree: {tuple(k.shape)} vs {tuple(v.shape)}"
            )
        block = KVBlock(k, v)
    if unknown:
        raise MemoryFormatError(f"unexpected tensors in a {memory_type} block: {sorted(unknown)}")
    return block


def zeros_like_block(block: MemoryBlock) -> MemoryBlock:
    """A block of the same type and shapes whose every tensor is zero (contributes nothing)."""
    return block_from_tensors(
        memory_type_of(block), {n: torch.zeros_like(t) for n, t in block.tensors().items()}
    )
