"""Block bytes <-> `MemoryBlock`: safetensors blobs decoded as views of one buffer.

A block is a safetensors blob (8-byte little-endian header length, a JSON header of dtype,
shape and data offsets per tensor, then the data). Decoding parses that header here, checks it
strictly (a block that passed its sha256 can still be the wrong block for this bank), and views
every tensor out of a single `bytearray`: no element-wise copies. Bytes that the caller does not
own (a tier's `memoryview` of an LMDB page lives only as long as its transaction) are copied into
a fresh `bytearray` once, so a decoded block always owns its memory.

Two codecs, marked in the blob's metadata: float blocks (no mark, codec 1: every tensor in the
bank's one float dtype, written as they always were, so existing banks keep their bytes and
sha256s) and int8 blocks (`"codec": "2"`, FFN only: `gate`, `up`, `down` int8 (`I8`) and their
`*.scale` float32 (`F32`) `[L, r]`, `server.model.memory`). A float block encoded for an int8
bank is quantized (`quantize_block`); an int8 block encoded for a float bank is dequantized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from server.bank.errors import BlockFormatError
from server.bank.layout import Shape
from server.bank.manifest import BankManifest
from server.model.memory import (
    FFN_SCALES,
    LORA_TARGETS,
    FFNBlock,
    MemoryBlock,
    MemoryFormatError,
    MemoryType,
    block_from_tensors,
    dequantize_block,
    memory_type_of,
    quantize_block,
)

BLOCK_FORMAT = "hmem-block"
CODEC_FLOAT = "1"  # not written: a block without a codec mark is a float block
CODEC_INT8 = "2"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors limit; a block's header is < 1 KiB
_ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I8": torch.int8,
}
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
_INT8_WEIGHTS = ("gate", "up", "down")
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_LORA_NAME_RE = re.compile(rf"(?:{'|'.join(LORA_TARGETS)})\.[ab]")

Buffer = bytes | bytearray | memoryview


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; only the dtypes a bank may store."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES.values():
            raise BlockFormatError(f"dtype {dtype} is not one a bank stores: {list(_TORCH_DTYPES)}")
        return dtype
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise BlockFormatError(
            f"dtype {dtype!r} is not one a bank stores: {list(_TORCH_DTYPES)}"
        ) from None


def unshared_cpu(
    tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory (as safetensors requires)."""
    out: dict[str, Tensor] = {}
    spans: list[tuple[int, int]] = []
    for name, t in tensors.items():
        c = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
        span = (c.data_ptr(), c.data_ptr() + c.nbytes)
        if c.nbytes and any(span[0] < end and start < span[1] for start, end in spans):
            c = c.clone()
            span = (c.data_ptr(), c.data_ptr() + c.nbytes)
        spans.append(span)
        out[name] = c
    return out


def as_stored(block: MemoryBlock, dtype: str | torch.dtype) -> MemoryBlock:
    """`block` in the form a bank of `dtype` stores: quantized for int8 (FFN only, else
    `BlockFormatError`), dequantized for a float dtype if it was int8, otherwise as it is."""
    want = torch_dtype(dtype)
    if want == torch.int8:
        try:
            return quantize_block(block)
        except MemoryFormatError as exc:
            raise BlockFormatError(str(exc)) from exc
    if isinstance(block, FFNBlock) and block.quantized:
        return dequantize_block(block, want)
    return block


def encode_block(block: MemoryBlock, *, dtype: str | torch.dtype) -> bytes:
    """A block as a safetensors blob, every tensor contiguous on CPU, stored as a bank of
    `dtype` stores it: cast to a float `dtype`, or int8 weights with float32 scales."""
    want = torch_dtype(dtype)
    block = as_stored(block, want)
    metadata = {"format": BLOCK_FORMAT, "memory_type": str(memory_type_of(block))}
    if want != torch.int8:
        tensors = unshared_cpu(block.tensors(), want)
    else:
        metadata["codec"] = CODEC_INT8
        tensors = unshared_cpu(
            {n: t.float() if n in FFN_SCALES else t for n, t in block.tensors().items()}
        )
    return canonical_safetensors(save_safetensors(tensors, metadata=metadata))


def canonical_safetensors(blob: bytes) -> bytes:
    """`blob` with its metadata keys sorted, so equal blocks are equal bytes (and sha256s).

    safetensors writes `__metadata__` from a hash map, in an order that varies between runs;
    tensors are already in a fixed order. Sorting keeps the header's length, so only the header
    bytes are rewritten.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    metadata = header.pop("__metadata__", None)
    ordered = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    text = json.dumps({**ordered, **header}, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, "a re-ordered header cannot grow"
    return blob[:8] + text.ljust(n) + blob[8 + n :]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a safetensors header; offsets are absolute within the blob."""

    name: str
    dtype: str
    shape: Shape
    start: int
    end: int


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BlockFormatError(f"block header names {key!r} twice")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return type(value) is int


def _tensor_spec(name: str, entry: object, data_start: int) -> TensorSpec:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise BlockFormatError(f"tensor {name!r}: header entry must have exactly {_ENTRY_KEYS}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ST_DTYPES:
        raise BlockFormatError(
            f"tensor {name!r}: dtype {dtype!r} is not one a bank stores ({list(_ST_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise BlockFormatError(f"tensor {name!r}: shape {shape!r} is not a list of sizes >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise BlockFormatError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    itemsize = _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != prod(shape) * itemsize:
        raise BlockFormatError(
            f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
            f"but shape {shape} of {dtype} needs {prod(shape) * itemsize}"
        )
    start = data_start + offsets[0]
    if start % itemsize:
        raise BlockFormatError(f"tensor {name!r}: data is not aligned to {itemsize} bytes")
    return TensorSpec(name, dtype, tuple(shape), start, data_start + offsets[1])


def read_header(view: memoryview) -> tuple[list[TensorSpec], dict[str, str]]:
    """Parse and check a safetensors header: tensors (in data order) and metadata."""
    size = view.nbytes
    if size < 8:
        raise BlockFormatError(f"block is truncated: {size} bytes, less than its 8-byte prefix")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise BlockFormatError(f"block header length {header_len} exceeds {MAX_HEADER_BYTES}")
    data_start = 8 + header_len
    if data_start > size:
        raise BlockFormatError(
            f"block header length {header_len} runs past the end of the block ({size} bytes)"
        )
    try:
        header = json.loads(bytes(view[8:data_start]), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlockFormatError(f"block header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BlockFormatError("block header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BlockFormatError("block header __metadata__ must map strings to strings")
    specs = sorted(
        (_tensor_spec(name, entry, data_start) for name, entry in header.items()),
        key=lambda s: (s.start, s.end),
    )
    pos = data_start
    for spec in specs:
        if spec.end > size:
            raise BlockFormatError(
                f"tensor {spec.name!r}: data ends at byte {spec.end}, past the end of the block "
                f"({size} bytes): truncated"
            )
        if spec.start < pos:
            raise BlockFormatError(f"tensor {spec.name!r}: data overlaps the previous tensor's")
        if spec.start > pos:
            raise BlockFormatError(f"tensor {spec.name!r}: unused bytes before its data")
        pos = spec.end
    if pos != size:
        raise BlockFormatError(f"block has {size - pos} bytes after its last tensor")
    return specs, metadata


def _as_byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _owned(view: memoryview) -> bytearray:
    """The block's bytes in a bytearray it can keep: the caller's own one, or one copy."""
    obj = view.obj
    if type(obj) is bytearray and not view.readonly and view.nbytes == len(obj):
        return obj
    return bytearray(view)


def check_shapes(tensors: Mapping[str, Tensor], expected: Mapping[str, Shape]) -> None:
    """The block holds exactly the `expected` tensors, each of exactly its shape."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise BlockFormatError(f"block is missing tensors {missing}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise BlockFormatError(f"block has unexpected tensors {extra}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise BlockFormatError(f"tensor {name!r}: shape {list(got)}, expected {list(shape)}")


def decode_block(
    buf: Buffer,
    *,
    memory_type: MemoryType,
    expected: Mapping[str, Shape] | None = None,
    dtype: str | torch.dtype | None = None,
) -> MemoryBlock:
    """Decode a block blob; its tensors are views of one buffer the block owns.

    `expected` (tensor name -> shape) and `dtype` are checked when given (`"int8"`: an int8
    block, its scales included in `expected`). Raises `BlockFormatError` naming what is wrong.
    """
    view = _as_byte_view(buf)
    specs, metadata = read_header(view)
    fmt, stored_type = metadata.get("format"), metadata.get("memory_type")
    if fmt is not None and fmt != BLOCK_FORMAT:
        raise BlockFormatError(f"block metadata format {fmt!r} is not {BLOCK_FORMAT!r}")
    if stored_type is not None and stored_type != str(memory_type):
        raise BlockFormatError(f"block holds a {stored_type} memory, expected {memory_type}")
    _check_dtypes(specs, metadata, memory_type, None if dtype is None else torch_dtype(dtype))
    if memory_type is MemoryType.LORA:
        bad_names = [s.name for s in specs if _LORA_NAME_RE.fullmatch(s.name) is None]
        if bad_names:
            raise BlockFormatError(f"unexpected tensors in a lora block: {sorted(bad_names)}")

    data = _owned(view)
    base = torch.frombuffer(data, dtype=torch.uint8)  # one storage for every tensor
    tensors = {s.name: base[s.start : s.end].view(_ST_DTYPES[s.dtype]).view(s.shape) for s in specs}
    if expected is not None:
        check_shapes(tensors, expected)
    try:
        return block_from_tensors(memory_type, tensors)
    except MemoryFormatError as exc:
        raise BlockFormatError(str(exc)) from exc


def _check_dtypes(
    specs: list[TensorSpec],
    metadata: Mapping[str, str],
    memory_type: MemoryType,
    want: torch.dtype | None,
) -> None:
    """A float block holds one float dtype (`want`, when given); an int8 block (codec mark 2,
    FFN only) int8 weights and float32 scales, and is wanted only where `want` is int8 or None."""
    codec = metadata.get("codec", CODEC_FLOAT)
    if codec not in (CODEC_FLOAT, CODEC_INT8):
        raise BlockFormatError(
            f"block codec {codec!r} is not one this hmem reads ({CODEC_FLOAT!r}: float, "
            f"{CODEC_INT8!r}: int8)"
        )
    # The tensor to name: a weight before a scale (scales come first in the data).
    ordered = sorted(specs, key=lambda s: s.name in FFN_SCALES)
    if codec == CODEC_FLOAT:
        if want == torch.int8:
            name, got = (ordered[0].name, ordered[0].dtype) if ordered else ("gate", "none")
            raise BlockFormatError(
                f"tensor {name!r}: dtype {got}, expected int8 (an int8 bank's blocks are int8 "
                f"with float32 scales, marked codec {CODEC_INT8!r})"
            )
        if want is not None:
            bad = next((s for s in ordered if _ST_DTYPES[s.dtype] != want), None)
            if bad is not None:
                raise BlockFormatError(f"tensor {bad.name!r}: dtype {bad.dtype}, expected {want}")
        int8 = next((s for s in ordered if s.dtype == "I8"), None)
        if int8 is not None:
            raise BlockFormatError(
                f"tensor {int8.name!r}: dtype I8 in a block not marked int8 (codec {CODEC_INT8!r})"
            )
        if len({s.dtype for s in specs}) > 1:
            raise BlockFormatError(f"block mixes dtypes {sorted(s.dtype for s in specs)}")
        return
    if want is not None and want != torch.int8:
        name, got = (ordered[0].name, ordered[0].dtype) if ordered else ("gate", "none")
        raise BlockFormatError(f"tensor {name!r}: dtype {got} (an int8 block), expected {want}")
    if memory_type is not MemoryType.FFN:
        raise BlockFormatError(f"an int8 block holds an ffn memory, not a {memory_type} memory")
    for s in ordered:
        need = "F32" if s.name in FFN_SCALES else "I8"
        if s.dtype != need:
            raise BlockFormatError(
                f"tensor {s.name!r}: dtype {s.dtype}, but an int8 block stores it as {need} "
                "(block mixes dtypes)"
            )
    names = {s.name for s in specs}
    missing = [n for n in (*_INT8_WEIGHTS, *FFN_SCALES) if n not in names]
    if missing:
        raise BlockFormatError(f"int8 block is missing tensors {missing}")


def block_nbytes(block: MemoryBlock) -> int:
    """Bytes of tensor data a decoded block holds (what it costs the RAM cache)."""
    return sum(t.nbytes for t in block.tensors().values())


class BankBlockCodec:
    """The `tiers.BlockCodec` of a bank: verified bytes -> a `MemoryBlock` checked for shape.

    A tier read knows no level, so a block may have the width of any of the bank's levels; every
    other dimension, the tensor names and the dtype are checked exactly.
    """

    def __init__(self, manifest: BankManifest) -> None:
        self.memory_type = manifest.memory_type
        self.dtype = torch_dtype(manifest.dtype)
        self._shapes_by_width = {r: manifest.shapes_for_width(r) for r in manifest.widths if r}

    def decode(self, view: memoryview) -> MemoryBlock:
        block = decode_block(view, memory_type=self.memory_type, dtype=self.dtype)
        shapes = self._shapes_by_width.get(block.width)
        if shapes is None:
            raise BlockFormatError(
                f"block width {block.width} is none of the bank's widths "
                f"{sorted(self._shapes_by_width)}"
            )
        check_shapes(block.tensors(), shapes)
        return block

    def nbytes(self, value: MemoryBlock) -> int:
        return block_nbytes(value)
