"""Memory blocks as tensors: the three memory types of the paper and their tensor layout.

A block is the memory of one cluster at one level, for every memory layer of the anchor. Its
tensors are stacked over layers (first dimension `n_layers`), so a block is a handful of
contiguous tensors that the codec can view straight out of the bytes a tier returned.

| type | tensors (names as stored) | shapes |
| --- | --- | --- |
| `ffn`  | `gate`, `up`, `down` | `[L, r, d]`, `[L, r, d]`, `[L, d, r]` |
| `lora` | `{target}.a`, `{target}.b` for each target | `[L, r, in]`, `[L, out, r]` |
| `kv`   | `k`, `v` | `[L, n_kv_heads, r, head_dim]` each |

An FFN block may be stored in int8 (`server.model.quant`): `gate`, `up` and `down` are int8 and
each has a float32 scale per memory neuron, `gate.scale`, `up.scale` and `down.scale`, all
`[L, r]`. For `gate` and `up` that is one scale per output row; for `down` one per input column
(neuron), so that a path's blocks, concatenated along `r`, keep their own scales: `down · (s ⊙ h)`.

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
from server.model.quant import dequantize_int8, quantize_int8

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
    "quantize_block",
    "zeros_like_block",
]

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class MemoryType(enum.StrEnum):
    FFN = "ffn"
    LORA = "lora"
    KV = "kv"


FFN_SCALES = ("gate.scale", "up.scale", "down.scale")


@dataclass(frozen=True, slots=True)
class FFNBlock:
    gate: Tensor  # [L, r, d]
    up: Tensor  # [L, r, d]
    down: Tensor  # [L, d, r]
    # int8 blocks: float32 scales [L, r] each (per neuron); None for float blocks.
    scales: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def width(self) -> int:
        return int(self.gate.shape[1])

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def tensors(self) -> dict[str, Tensor]:
        out = {"gate": self.gate, "up": self.up, "down": self.down}
        if self.scales is not None:
            out.update(zip(FFN_SCALES, self.scales, strict=True))
        return out


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
        unknown = set(tensors) - {"gate", "up", "down", *FFN_SCALES}
        gate, up, down = (_need(tensors, n, 3) for n in ("gate", "up", "down"))
        L, r, d = gate.shape
        if up.shape != gate.shape or down.shape != (L, d, r):
            raise MemoryFormatError(
                f"ffn block shapes disagree: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                f"down {tuple(down.shape)} (expected down {(L, d, r)})"
            )
        block: MemoryBlock = FFNBlock(gate, up, down, _ffn_scales(tensors, gate, (L, r)))
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


def _ffn_scales(
    tensors: Mapping[str, Tensor], gate: Tensor, shape: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor] | None:
    """An FFN block's scales: all three with int8 weights, none with float ones."""
    present = [n for n in FFN_SCALES if n in tensors]
    weights_int8 = {tensors[n].dtype == torch.int8 for n in ("gate", "up", "down")}
    if len(weights_int8) != 1:
        raise MemoryFormatError("ffn block mixes int8 and float weights")
    if not weights_int8.pop():
        if present:
            raise MemoryFormatError(f"ffn block of float weights has scales {present}")
        return None
    if len(present) != len(FFN_SCALES):
        missing = sorted(set(FFN_SCALES) - set(present))
        raise MemoryFormatError(f"int8 ffn block is missing its scales {missing}")
    scales = tuple(tensors[n] for n in FFN_SCALES)
    for name, t in zip(FFN_SCALES, scales, strict=True):
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise MemoryFormatError(
                f"scale {name!r}: {t.dtype} {list(t.shape)}, expected floats of {list(shape)}"
            )
    return scales[0], scales[1], scales[2]


def quantize_block(block: MemoryBlock) -> FFNBlock:
    """An FFN block in int8 with a float32 scale per neuron (see the module docstring). Only FFN
    memories are stored in int8: LoRA and KV blocks raise `MemoryFormatError`."""
    if not isinstance(block, FFNBlock):
        raise MemoryFormatError(
            f"int8 storage holds ffn memories only, not {memory_type_of(block)} memories"
        )
    if block.quantized:
        return block
    gate, gate_s = quantize_int8(block.gate, dim=-1)  # a scale per row r
    up, up_s = quantize_int8(block.up, dim=-1)
    down, down_s = quantize_int8(block.down, dim=-2)  # a scale per column r
    return FFNBlock(gate, up, down, (gate_s, up_s, down_s))


def dequantize_block(block: MemoryBlock, dtype: torch.dtype) -> MemoryBlock:
    """A block in float `dtype` (an int8 FFN block widened; any other block cast)."""
    if isinstance(block, FFNBlock) and block.scales is not None:
        gs, us, ds = block.scales
        return FFNBlock(
            dequantize_int8(block.gate, gs, dim=-1, dtype=dtype),
            dequantize_int8(block.up, us, dim=-1, dtype=dtype),
            dequantize_int8(block.down, ds, dim=-2, dtype=dtype),
        )
    tensors = {n: t.to(dtype) for n, t in block.tensors().items()}
    return block_from_tensors(memory_type_of(block), tensors)


def zeros_like_block(block: MemoryBlock) -> MemoryBlock:
    """A block of the same type and shapes whose every tensor is zero (contributes nothing)."""
    return block_from_tensors(
        memory_type_of(block), {n: torch.zeros_like(t) for n, t in block.tensors().items()}
    )
