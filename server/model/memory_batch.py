"""A batch's memories as tensors: each sequence's blocks, concatenated and padded to one width.

A sequence carries the blocks of its cluster path (one per level, any subset of levels). Its
blocks are concatenated along the memory width `r` (the paper's "grow the inner dimension"),
and the batch is padded to the widest sequence. Padding is inert: zero FFN and LoRA rows add
nothing, and padded KV-memory slots are masked out of the softmax. Tensors are laid out layer
first (`[L, B, ...]`) so that each layer takes a contiguous slice and applies its memories to
the whole batch with batched matmuls, as multi-LoRA servers do for heterogeneous batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.model.errors import MemoryFormatError
from server.model.memory import FFNBlock, KVBlock, LoRABlock, MemoryBlock


@dataclass(frozen=True, slots=True)
class FFNMemoryBatch:
    gate: Tensor  # [L, B, R, d]
    up: Tensor  # [L, B, R, d]
    down: Tensor  # [L, B, d, R]


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


def _pad_cat(parts: Sequence[Tensor], dim: int, width: int, like: Tensor) -> Tensor:
    """Concatenate `parts` along `dim` and zero-pad that dim to `width`."""
    shape = list(like.shape)
    shape[dim] = width
    out = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if parts:
        joined = torch.cat(list(parts), dim=dim)
        out.narrow(dim, 0, joined.shape[dim]).copy_(joined)
    return out


def build_memory_batch(
    per_sequence: Sequence[Sequence[MemoryBlock]],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> MemoryBatch | None:
    """Stack each sequence's blocks into one padded batch; None when no sequence has memory."""
    blocks = [b for seq in per_sequence for b in seq]
    if not blocks:
        return None
    kinds = {type(b) for b in blocks}
    if len(kinds) != 1:
        raise MemoryFormatError(f"a batch mixes memory types {sorted(k.__name__ for k in kinds)}")
    first = blocks[0]
    widths = [sum(b.width for b in seq) for seq in per_sequence]
    R = max(widths)

    def stack(name: str, dim: int) -> Tensor:
        # one [L, 1, ...] slab per sequence (dim counted within the block tensor, 0 = layers)
        like_block = first.tensors()[name]
        rows = []
        for seq in per_sequence:
            parts = [b.tensors()[name].to(device=device, dtype=dtype) for b in seq]
            like = like_block.to(device=device, dtype=dtype)
            rows.append(_pad_cat(parts, dim, R, like))
        return torch.stack(rows, dim=1)  # [L, B, ...]

    if isinstance(first, FFNBlock):
        return FFNMemoryBatch(gate=stack("gate", 1), up=stack("up", 1), down=stack("down", 2))
    if isinstance(first, LoRABlock):
        targets = list(first.a)
        for b in blocks:
            assert isinstance(b, LoRABlock)
            if list(b.a) != targets:
                raise MemoryFormatError(f"LoRA blocks target {list(b.a)} and {targets}")
        return LoRAMemoryBatch(
            a={t: stack(f"{t}.a", 1) for t in targets},
            b={t: stack(f"{t}.b", 2) for t in targets},
        )
    assert isinstance(first, KVBlock)
    valid = torch.zeros(len(per_sequence), R, dtype=torch.bool, device=device)
    for i, w in enumerate(widths):
        valid[i, :w] = True
    return KVMemoryBatch(k=stack("k", 2), v=stack("v", 2), valid=valid)
