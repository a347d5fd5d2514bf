"""A batch's memories as tensors: each sequence's blocks, concatenated and padded to one width.

A sequence carries the blocks of its cluster path (one per level, any subset of levels). Its
blocks are concatenated along the memory width `r` (the paper's "grow the inner dimension"),
and the batch is padded to the widest sequence. Padding is inert: zero FFN and LoRA rows add
nothing, and padded KV-memory slots are masked out of the softmax. Tensors are laid out layer
first (`[L, B, ...]`) so that each layer takes a contiguous slice and applies its memories to
the whole batch with batched matmuls, as multi-LoRA servers do for heterogeneous batches.

int8 FFN blocks stay int8 in the batch (half the bytes to copy and to read each step), with
their per-neuron scales beside them in the model's dtype; their width is padded to a multiple of
`INT8_K_ALIGN`, which the int8 kernel needs, with zero weights and zero scales (inert).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.model.errors import MemoryFormatError
from server.model.memory import FFNBlock, KVBlock, LoRABlock, MemoryBlock
from server.model.quant import INT8_K_ALIGN


@dataclass(frozen=True, slots=True)
class FFNMemoryBatch:
    gate_up: Tensor  # [L, B, 2R, d]: gate rows, then up rows (one matmul computes both)
    down: Tensor  # [L, B, d, R]
    # int8 batches (gate_up and down int8): scales in the model's dtype, None for float ones.
    gate_up_scale: Tensor | None = None  # [L, B, 2R]: per output row of gate_up
    down_scale: Tensor | None = None  # [L, B, R]: per input column of down (per neuron)
    ones: Tensor | None = None  # [d]: the unit output scale the int8 kernel takes for down

    @property
    def gate(self) -> Tensor:  # [L, B, R, d], a view
        return self.gate_up[:, :, : self.down.shape[-1]]

    @property
    def up(self) -> Tensor:  # [L, B, R, d], a view
        return self.gate_up[:, :, self.down.shape[-1] :]


@dataclass(frozen=True, slots=True)
class LoRAMemoryBatch:
    a: dict[str, Tensor]  # target -> [L, B, R, in]
    b: dict[str, Tensor]  # target -> [L, B, out, R]


@dataclass(frozen=True, slots=True)
class KVMemoryBatch:
    k: Tensor  # [L, B, n_kv_heads, R, head_dim]
    v: Tensor  # [L, B, n_kv_heads, R, head_dim]
    valid: Tensor  # [B, R] bool: slots that hold a real key/value pair


MemoryBatch = FFNMemoryBatch | LoRAMemoryBatch | KVMemoryBatch


def build_memory_batch(
    per_sequence: Sequence[Sequence[MemoryBlock]],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> MemoryBatch | None:
    """Stack each sequence's blocks into one padded batch; None when no sequence has memory.

    Each batch tensor is allocated once and every block tensor copied (cast to `dtype`, moved
    to `device`) straight into its slice: no per-sequence concatenation, padding or stacking
    copies, and only the padding is zeroed.
    """
    blocks = [b for seq in per_sequence for b in seq]
    if not blocks:
        return None
    kinds = {type(b) for b in blocks}
    if len(kinds) != 1:
        raise MemoryFormatError(f"a batch mixes memory types {sorted(k.__name__ for k in kinds)}")
    first = blocks[0]
    quantized = isinstance(first, FFNBlock) and first.quantized
    if any(isinstance(b, FFNBlock) and b.quantized != quantized for b in blocks):
        raise MemoryFormatError("a batch mixes int8 and float memory blocks")
    widths = [sum(b.width for b in seq) for seq in per_sequence]
    R = max(widths)
    if quantized:
        R = -(-R // INT8_K_ALIGN) * INT8_K_ALIGN

    def gather(name: str, dim: int, out: Tensor | None = None) -> Tensor:
        """[L, B, ...] of tensor `name`, whose width is `dim` of a block's [L, ...] tensor
        (written into `out` when given, a view of that shape)."""
        like = first.tensors()[name].shape
        shape = (like[0], len(per_sequence), *like[1:dim], R, *like[dim + 1 :])
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=device)
        for row, (seq, width) in enumerate(zip(per_sequence, widths, strict=True)):
            dst = out[:, row]  # [L, ...]: this sequence's slab, a view
            offset = 0
            for block in seq:
                src = block.tensors()[name]
                r = src.shape[dim]
                if src.shape[:dim] != like[:dim] or src.shape[dim + 1 :] != like[dim + 1 :]:
                    raise MemoryFormatError(
                        f"memory tensor {name!r} has shape {tuple(src.shape)} in one block "
                        f"and {tuple(like)} in another (only the width may differ)"
                    )
                dst.narrow(dim, offset, r).copy_(src)
                offset += r
            dst.narrow(dim, width, R - width).zero_()  # inert padding
        return out

    if isinstance(first, FFNBlock):
        L, d = first.gate.shape[0], first.gate.shape[2]
        B = len(per_sequence)
        wdtype = torch.int8 if quantized else dtype
        gate_up = torch.empty((L, B, 2 * R, d), dtype=wdtype, device=device)
        gather("gate", 1, gate_up[:, :, :R])
        gather("up", 1, gate_up[:, :, R:])
        down = torch.empty((L, B, d, R), dtype=wdtype, device=device)
        gather("down", 2, down)
        if not quantized:
            return FFNMemoryBatch(gate_up=gate_up, down=down)
        gate_up_scale = torch.empty((L, B, 2 * R), dtype=dtype, device=device)
        gather("gate.scale", 1, gate_up_scale[:, :, :R])
        gather("up.scale", 1, gate_up_scale[:, :, R:])
        return FFNMemoryBatch(
            gate_up=gate_up,
            down=down,
            gate_up_scale=gate_up_scale,
            down_scale=gather("down.scale", 1),
            ones=torch.ones(d, dtype=dtype, device=device),
        )
    if isinstance(first, LoRABlock):
        targets = list(first.a)
        for b in blocks:
            assert isinstance(b, LoRABlock)
            if list(b.a) != targets:
                raise MemoryFormatError(f"LoRA blocks target {list(b.a)} and {targets}")
        return LoRAMemoryBatch(
            a={t: gather(f"{t}.a", 1) for t in targets},
            b={t: gather(f"{t}.b", 2) for t in targets},
        )
    assert isinstance(first, KVBlock)
    valid = torch.zeros(len(per_sequence), R, dtype=torch.bool, device=device)
    for i, w in enumerate(widths):
        valid[i, :w] = True
    return KVMemoryBatch(k=gather("k", 2), v=gather("v", 2), valid=valid)


def compact_rows(batch: MemoryBatch, moves: Sequence[tuple[int, int]], keep: int) -> MemoryBatch:
    """The batch after sequences left it: each (src, dst) row copied over in order, as the
    engine moves its KV-cache rows, then the first `keep` rows (views: nothing is reallocated).

    One row's copy instead of a rebuild of every row: at 16 sequences of 36.6 MB each, a
    rebuild copies 0.59 GB every time one of them ends.
    """

    def rows(t: Tensor, dim: int) -> Tensor:
        for src, dst in moves:
            t.select(dim, dst).copy_(t.select(dim, src))
        return t.narrow(dim, 0, keep)

    if isinstance(batch, FFNMemoryBatch):
        return FFNMemoryBatch(
            gate_up=rows(batch.gate_up, 1),
            down=rows(batch.down, 1),
            gate_up_scale=None if batch.gate_up_scale is None else rows(batch.gate_up_scale, 1),
            down_scale=None if batch.down_scale is None else rows(batch.down_scale, 1),
            ones=batch.ones,
        )
    if isinstance(batch, LoRAMemoryBatch):
        return LoRAMemoryBatch(
            a={t: rows(w, 1) for t, w in batch.a.items()},
            b={t: rows(w, 1) for t, w in batch.b.items()},
        )
    return KVMemoryBatch(k=rows(batch.k, 1), v=rows(batch.v, 1), valid=rows(batch.valid, 0))
