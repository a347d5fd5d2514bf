"""What a block of a bank must look like: tensor names and shapes from the anchor's dimensions.

The table in `server.model.memory` fixes the layout of each memory type; this module fills it in
for one model and one width `r`, so that the writer, the codec and the tiers' codec all check a
block against the same expectation. No torch here: shapes are tuples and dtypes are names.

A bank stores its blocks in one dtype. The float dtypes store every tensor in it; `int8` (FFN
memories only) stores `gate`, `up` and `down` as int8 with a float32 scale per memory neuron
beside each (`gate.scale`, `up.scale`, `down.scale`, `[L, r]`; `server.model.memory`), so an
int8 block is about half the bytes of a bf16 one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from math import prod
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.model.memory import FFN_SCALES, LORA_TARGETS, MemoryType

FloatDType = Literal["float32", "bfloat16", "float16"]
BankDType = Literal["float32", "bfloat16", "float16", "int8"]
FLOAT_DTYPES: tuple[FloatDType, ...] = ("float32", "bfloat16", "float16")
BANK_DTYPES: tuple[BankDType, ...] = (*FLOAT_DTYPES, "int8")
DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
INT8 = "int8"
SCALE_DTYPE: FloatDType = "float32"  # an int8 block's scales

Shape = tuple[int, ...]
PositiveInt = Annotated[int, Field(strict=True, gt=0)]


class ModelShape(BaseModel):
    """The anchor dimensions a bank's blocks are built for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_layers: PositiveInt
    d_model: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt
    head_dim: PositiveInt
    intermediate_size: PositiveInt

    @model_validator(mode="after")
    def _grouped_heads(self) -> ModelShape:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        return self


def lora_dims(model: ModelShape, target: str) -> tuple[int, int]:
    """(in, out) features of the projection a LoRA target patches."""
    d, inter = model.d_model, model.intermediate_size
    q_out, kv_out = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    dims = {
        "q": (d, q_out),
        "k": (d, kv_out),
        "v": (d, kv_out),
        "o": (q_out, d),
        "gate": (d, inter),
        "up": (d, inter),
        "down": (inter, d),
    }
    try:
        return dims[target]
    except KeyError:
        raise ValueError(
            f"unknown LoRA target {target!r}; expected one of {list(LORA_TARGETS)}"
        ) from None


def block_shapes(
    memory_type: MemoryType,
    model: ModelShape,
    *,
    width: int,
    lora_targets: Iterable[str] | None = None,
    dtype: str | None = None,
) -> dict[str, Shape]:
    """Tensor name -> shape of a block of `memory_type` with `width` (r) for `model`.

    With `dtype="int8"` the block's scales too (FFN only); any other dtype, or none, gives the
    float layout.
    """
    L, d, r = model.n_layers, model.d_model, width
    if dtype == INT8 and memory_type is not MemoryType.FFN:
        raise ValueError(f"int8 storage is for ffn memories only, not {memory_type} memories")
    if memory_type is MemoryType.FFN:
        shapes: dict[str, Shape] = {"gate": (L, r, d), "up": (L, r, d), "down": (L, d, r)}
        if dtype == INT8:
            shapes.update(dict.fromkeys(FFN_SCALES, (L, r)))
        return shapes
    if memory_type is MemoryType.KV:
        shape = (L, model.n_kv_heads, r, model.head_dim)
        return {"k": shape, "v": shape}
    if not lora_targets:
        raise ValueError("lora_targets: a lora block needs at least one target")
    shapes = {}
    for target in lora_targets:
        n_in, n_out = lora_dims(model, target)
        shapes[f"{target}.a"] = (L, r, n_in)
        shapes[f"{target}.b"] = (L, n_out, r)
    return shapes


def tensor_dtype(name: str, dtype: str) -> str:
    """The dtype tensor `name` of a block is stored in, in a bank of `dtype`."""
    return SCALE_DTYPE if dtype == INT8 and name in FFN_SCALES else dtype


def payload_bytes(shapes: Mapping[str, Shape], dtype: str) -> int:
    """Bytes of tensor data (no header) of a block with these shapes stored in a bank of
    `dtype` (an int8 bank's shapes include the scales: `block_shapes(..., dtype="int8")`)."""
    return sum(prod(s) * DTYPE_ITEMSIZE[tensor_dtype(n, dtype)] for n, s in shapes.items())


def zeroed_tensor_names(memory_type: MemoryType, names: Iterable[str]) -> list[str]:
    """The tensors that start at zero so that a fresh memory changes nothing (paper, sec. 3)."""
    if memory_type is MemoryType.FFN:
        zero = ("down",)
    elif memory_type is MemoryType.KV:
        zero = ("v",)
    else:
        return [n for n in names if n.endswith(".b")]
    return [n for n in names if n in zero]
