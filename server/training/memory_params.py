"""Every memory block of a bank under training, as parameters: one `Parameter` per block tensor.

One parameter per block (not one tensor per level) keeps updates sparse: a block off every path
of a batch gets no gradient, so AdamW neither moves it nor decays it (`docs/longtail.md`,
finding 8).
Blocks start as a fresh memory does: small random values, with the output side (FFN `down`,
LoRA `b`, KV `v`) at zero, so an untrained memory leaves the anchor unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from server.bank.layout import ModelShape, block_shapes, zeroed_tensor_names
from server.model.memory import MemoryBlock, MemoryType, block_from_tensors

INIT_STD = 0.02
GENERIC = -1  # the node id under which a level's generic memory is kept


class MemoryParams(nn.Module):
    def __init__(
        self,
        *,
        memory_type: MemoryType,
        model: ModelShape,
        branching: int,
        widths: Sequence[int],
        lora_targets: Sequence[str] | None,
        seed: int,
    ) -> None:
        super().__init__()
        self.memory_type = memory_type
        self.branching = branching
        self.widths = list(widths)
        self.params = nn.ParameterList()
        self._index: dict[tuple[int, int], dict[str, int]] = {}
        gen = torch.Generator().manual_seed(seed)
        for level, width in enumerate(self.widths, start=1):
            if width == 0:
                continue
            shapes = block_shapes(memory_type, model, width=width, lora_targets=lora_targets)
            zeroed = set(zeroed_tensor_names(memory_type, shapes))
            for node in [*range(branching**level), GENERIC]:
                names = {}
                for name, shape in shapes.items():
                    value = (
                        torch.zeros(shape)
                        if name in zeroed
                        else torch.randn(shape, generator=gen) * INIT_STD
                    )
                    names[name] = len(self.params)
                    self.params.append(nn.Parameter(value))
                self._index[(level, node)] = names

    def levels(self) -> list[int]:
        return [lvl for lvl, w in enumerate(self.widths, start=1) if w > 0]

    def block(self, level: int, node: int) -> MemoryBlock:
        """The block of `node` at `level` (GENERIC for the generic memory), as live parameters."""
        names = self._index[(level, node)]
        tensors: dict[str, Tensor] = {n: self.params[i] for n, i in names.items()}
        return block_from_tensors(self.memory_type, tensors)

    def path_blocks(self, node_ids: Sequence[int]) -> list[MemoryBlock]:
        """The blocks of a path (node id per level, level 1 first); levels of width 0 skipped."""
        return [self.block(lvl, int(node_ids[lvl - 1])) for lvl in self.levels()]

    def generic_blocks(self) -> list[MemoryBlock]:
        return [self.block(lvl, GENERIC) for lvl in self.levels()]

    def blocks(self) -> Iterator[tuple[int, int, MemoryBlock]]:
        """(level, node, block) of every cluster block; the generic memory excluded."""
        for level, node in self._index:
            if node != GENERIC:
                yield level, node, self.block(level, node)

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"p{i}": p.detach() for i, p in enumerate(self.params)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"p{i}"])
