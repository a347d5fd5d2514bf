"""A batch's memories: bit for bit the blocks concatenated, zero-padded and stacked."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from server.model.memory import KVBlock, MemoryBlock, MemoryFormatError, MemoryType
from server.model.memory_batch import (
    FFNMemoryBatch,
    KVMemoryBatch,
    LoRAMemoryBatch,
    build_memory_batch,
    compact_rows,
)
from tests.server.model.conftest import random_block

# Width of each tensor within a block's [L, ...] tensor (0 is the layer dim).
WIDTH_DIM = {"gate": 1, "up": 1, "down": 2, "a": 1, "b": 2, "k": 2, "v": 2}


def reference(
    per_sequence: Sequence[Sequence[MemoryBlock]], name: str, dtype: torch.dtype
) -> Tensor:
    """The straightforward way: cat each sequence's blocks, zero-pad, stack rows on dim 1."""
    dim = WIDTH_DIM[name.rsplit(".", 1)[-1]]
    like = next(b for seq in per_sequence for b in seq).tensors()[name]
    rows = []
    for seq in per_sequence:
        parts = [b.tensors()[name].to(dtype) for b in seq]
        row = torch.cat(parts, dim=dim) if parts else like.to(dtype).narrow(dim, 0, 0)
        rows.append(row)
    R = max(row.shape[dim] for row in rows)
    padded = []
    for row in rows:
        pad = list(row.shape)
        pad[dim] = R - row.shape[dim]
        padded.append(torch.cat([row, torch.zeros(pad, dtype=dtype)], dim=dim))
    return torch.stack(padded, dim=1)


def batch_tensors(batch: object) -> dict[str, Tensor]:
    if isinstance(batch, FFNMemoryBatch):
        return {"gate": batch.gate, "up": batch.up, "down": batch.down}
    if isinstance(batch, LoRAMemoryBatch):
        return {
            **{f"{t}.a": a for t, a in batch.a.items()},
            **{f"{t}.b": b for t, b in batch.b.items()},
        }
    assert isinstance(batch, KVMemoryBatch)
    return {"k": batch.k, "v": batch.v}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(MemoryType))
def test_the_batch_equals_cat_pad_and_stack_bit_for_bit(
    kind: MemoryType, dtype: torch.dtype
) -> None:
    # An empty sequence first (the batch's shapes come from a later one), then widths
    # 8+4+2, 4 and 2+2: each row padded to 14 but the widest.
    widths = [[], [8, 4, 2], [4], [2, 2]]
    per_sequence = [
        [random_block(kind, w, seed=10 * i + j) for j, w in enumerate(ws)]
        for i, ws in enumerate(widths)
    ]
    batch = build_memory_batch(per_sequence, dtype=dtype)
    got = batch_tensors(batch)
    assert set(got) == set(per_sequence[1][0].tensors())
    for name, tensor in got.items():
        expected = reference(per_sequence, name, dtype)
        assert tensor.dtype == dtype
        assert tensor.shape == expected.shape, name
        assert torch.equal(tensor, expected), name
    if isinstance(batch, KVMemoryBatch):
        assert batch.valid.tolist() == [[i < w for i in range(14)] for w in (0, 14, 4, 4)]


@pytest.mark.parametrize("kind", list(MemoryType))
def test_a_batch_without_padding_equals_the_reference(kind: MemoryType) -> None:
    per_sequence = [[random_block(kind, 4, seed=i)] for i in range(3)]
    got = batch_tensors(build_memory_batch(per_sequence, dtype=torch.float32))
    for name, tensor in got.items():
        assert torch.equal(tensor, reference(per_sequence, name, torch.float32)), name


def test_no_memory_is_none() -> None:
    assert build_memory_batch([[], []], dtype=torch.float32) is None


def test_blocks_that_differ_in_more_than_width_are_refused_by_name() -> None:
    wide = random_block(MemoryType.KV, 4, seed=0)
    assert isinstance(wide, KVBlock)
    one_layer = KVBlock(k=wide.k[:1], v=wide.v[:1])  # would broadcast over the layers
    with pytest.raises(MemoryFormatError, match="'k' has shape"):
        build_memory_batch([[wide], [one_layer]], dtype=torch.float32)
    ffn = random_block(MemoryType.FFN, 4, seed=1)
    with pytest.raises(MemoryFormatError, match="mixes memory types"):
        build_memory_batch([[wide], [ffn]], dtype=torch.float32)


@pytest.mark.parametrize("kind", list(MemoryType))
def test_compacting_rows_equals_building_the_remaining_sequences(kind: MemoryType) -> None:
    """Sequences 1 and 3 of 5 end: the engine moves row 4 into row 1 and drops rows 3 and 4
    (its KV cache rows move alike); the batch is then that of sequences 0, 4 and 2."""
    widths = [[4, 2], [4, 3], [2, 2, 1], [4], [3]]
    seqs = [
        [random_block(kind, w, seed=10 * i + j) for j, w in enumerate(ws)]
        for i, ws in enumerate(widths)
    ]
    batch = build_memory_batch(seqs, dtype=torch.float32)
    assert batch is not None
    compacted = compact_rows(batch, [(4, 1)], 3)
    got = batch_tensors(compacted)
    remaining = [seqs[0], seqs[4], seqs[2]]
    if isinstance(compacted, KVMemoryBatch):
        assert compacted.valid.tolist() == [[i < w for i in range(7)] for w in (6, 3, 5)]
    for name, tensor in got.items():
        expected = reference(remaining, name, torch.float32)  # padded to 6, not to 7
        dim = WIDTH_DIM[name.rsplit(".", 1)[-1]] + 1  # + the batch dim
        assert tensor.shape[1] == 3, name
        assert torch.equal(tensor.narrow(dim, 0, 6), expected), name
        assert not tensor.narrow(dim, 6, 1).any(), name  # the old padding stays inert
