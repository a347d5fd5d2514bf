"""The KV cache: every layer's keys and values, stored at each token's position, and where one
forward pass writes in it (`CacheSlots`, made once per pass rather than once per layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from server.model.config import AnchorConfig


class KVCache:
    """Keys and values of every layer, stored at each token's position: [L, B, n_kv, S, hd]."""

    def __init__(
        self,
        config: AnchorConfig,
        *,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of batch rows start..stop-1: writes through it land in this cache."""
        view = object.__new__(KVCache)
        view.k = self.k[:, start:stop]
        view.v = self.v[:, start:stop]
        view.max_len = self.max_len
        return view

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions over row `dst` (compacting a batch)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def write(self, layer: int, at: CacheSlots, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, n_kv, T, hd] at `at`'s positions; return keys/values [:span]."""
        if k.shape[0] == 1:  # one row: a copy along the positions (cheaper than indexing)
            self.k[layer].index_copy_(2, at.positions[0], k)
            self.v[layer].index_copy_(2, at.positions[0], v)
        else:  # [B, S, n_kv, hd] views, indexed by (batch row, position)
            self.k[layer].transpose(1, 2)[at.rows, at.positions] = k.transpose(1, 2)
            self.v[layer].transpose(1, 2)[at.rows, at.positions] = v.transpose(1, 2)
        return self.k[layer, :, :, : at.span], self.v[layer, :, :, : at.span]


@dataclass(frozen=True, slots=True)
class CacheSlots:
    """Where one forward pass writes in a `KVCache`: the same for every layer, so made once."""

    cache: KVCache
    positions: Tensor  # [B, T]
    rows: Tensor  # [B, T]: each token's batch row
    span: int  # positions 0..span-1 are attended to

    @classmethod
    def of(cls, cache: KVCache, positions: Tensor, span: int) -> CacheSlots:
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        return cls(cache, positions, rows.expand_as(positions), span)
