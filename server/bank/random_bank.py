"""`write_random_bank`: a small bank of random memories, for tests and demos.

Every block (and the generic memory) holds small random values (std 0.02), and the centroids are
random unit vectors. The same seed writes byte-identical files. `zero_down` zeroes the tensor a
freshly initialised memory starts at zero (FFN `down`, LoRA `b`, KV `v`): such a bank changes
nothing in the anchor's output, which tests use to check that memories are wired in harmlessly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from server.bank.layout import BankDType, ModelShape, Shape, block_shapes, zeroed_tensor_names
from server.bank.manifest import BankManifest
from server.bank.writer import BankWriter
from server.model.memory import MemoryBlock, MemoryType, block_from_tensors
from server.routing import HashedTfidfEmbedder

TINY_MODEL = ModelShape(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64
)
DEFAULT_EMBEDDER: dict[str, Any] = {"kind": "hashed-tfidf", "dim": 64, "ngram_max": 2, "seed": 0}
INIT_STD = 0.02


def random_block(
    memory_type: MemoryType,
    shapes: Mapping[str, Shape],
    *,
    generator: torch.Generator,
    zero_down: bool = False,
) -> MemoryBlock:
    """A block of the given shapes with N(0, 0.02^2) values (float32)."""
    zeroed = set(zeroed_tensor_names(memory_type, shapes)) if zero_down else set()
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator) * INIT_STD
        tensors[name] = torch.zeros(shape) if name in zeroed else t
    return block_from_tensors(memory_type, tensors)


def random_centroids(n: int, dim: int, *, generator: torch.Generator) -> torch.Tensor:
    """`n` random unit vectors, float32 [n, dim]."""
    c = torch.randn(n, dim, generator=generator)
    norms: torch.Tensor = c.norm(dim=1, keepdim=True)
    return c / norms


def write_random_bank(
    out_dir: str | Path,
    *,
    bank_id: str = "tiny",
    memory_type: MemoryType = MemoryType.FFN,
    levels: int = 2,
    branching: int = 4,
    widths: Sequence[int] = (8, 4),
    model: ModelShape | None = None,
    embedder: Mapping[str, Any] | None = None,
    dtype: BankDType = "float32",
    seed: int = 0,
    lora_targets: Sequence[str] | None = None,
    generic: bool = True,
    zero_down: bool = False,
    anchor_dir: str | Path | None = None,
    overwrite: bool = False,
) -> BankManifest:
    """Write a bank of random blocks for every node of every level with memory; its manifest.

    Without `anchor_dir` the bank has no anchor: open it with `Bank.open(..., require_anchor=
    False)`.
    """
    gen = torch.Generator().manual_seed(seed)
    with BankWriter(
        out_dir,
        bank_id=bank_id,
        memory_type=memory_type,
        levels=levels,
        branching=branching,
        widths=tuple(widths),
        dtype=dtype,
        model=model or TINY_MODEL,
        embedder=dict(DEFAULT_EMBEDDER if embedder is None else embedder),
        lora_targets=None if lora_targets is None else list(lora_targets),
        overwrite=overwrite,
    ) as writer:
        m = writer.manifest
        dim = int(m.embedder["dim"])
        router = {
            f"centroids.L{level}": random_centroids(m.n_nodes(level), dim, generator=gen)
            for level in range(1, levels + 1)
        }
        if m.embedder["kind"] == "hashed-tfidf":
            # An unfitted embedder's state (idf = 1), so the router loads as the bank says.
            state = HashedTfidfEmbedder(
                dim=dim,
                ngram_max=int(m.embedder.get("ngram_max", 2)),
                seed=int(m.embedder.get("seed", 0)),
                idf_power=float(m.embedder.get("idf_power", 2.0)),
            ).state_tensors()
            router.update({f"embedder.{name}": t for name, t in state.items()})
        writer.write_router(router)
        for level in m.memory_levels():
            # Float weights; an int8 bank's writer quantizes them.
            shapes = block_shapes(
                memory_type, m.model, width=m.width(level), lora_targets=m.lora_targets
            )
            for node in range(m.n_nodes(level)):
                block = random_block(memory_type, shapes, generator=gen, zero_down=zero_down)
                writer.write_block(level, node, block)
            if generic:
                block = random_block(memory_type, shapes, generator=gen, zero_down=zero_down)
                writer.write_generic(level, block)
        if anchor_dir is not None:
            writer.copy_anchor(anchor_dir)
        return writer.commit()
