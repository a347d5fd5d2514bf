"""Memory block assembly: names and shapes checked per memory type."""

from __future__ import annotations

import pytest
import torch

from server.model.memory import MemoryFormatError, MemoryType, block_from_tensors, zeros_like_block
from tests.server.model.conftest import random_block


@pytest.mark.parametrize("kind", list(MemoryType))
def test_blocks_round_trip_through_named_tensors(kind: MemoryType) -> None:
    block = random_block(kind, 4, seed=0)
    again = block_from_tensors(kind, block.tensors())
    assert again.tensors().keys() == block.tensors().keys()
    assert again.width == 4
    assert all(not t.any() for t in zeros_like_block(block).tensors().values())


@pytest.mark.parametrize(
    ("kind", "tensors", "message"),
    [
        (
            MemoryType.FFN,
            {"gate": torch.zeros(2, 4, 8), "up": torch.zeros(2, 4, 8)},
            "missing tensor 'down'",
        ),
        (
            MemoryType.FFN,
            {
                "gate": torch.zeros(2, 4, 8),
                "up": torch.zeros(2, 4, 8),
                "down": torch.zeros(2, 4, 8),
            },
            "shapes disagree",
        ),
        (
            MemoryType.LORA,
            {"q.a": torch.zeros(2, 4, 8), "q.b": torch.zeros(2, 8, 4), "q.c": torch.zeros(1)},
            "q.c",
        ),
        (MemoryType.LORA, {"x.a": torch.zeros(2, 4, 8), "x.b": torch.zeros(2, 8, 4)}, "x.a"),
        (MemoryType.KV, {"k": torch.zeros(2, 2, 4, 8), "v": torch.zeros(2, 2, 3, 8)}, "disagree"),
    ],
)
def test_malformed_blocks_are_refused_by_name(
    kind: MemoryType, tensors: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(MemoryFormatError, match=message):
        block_from_tensors(kind, tensors)
