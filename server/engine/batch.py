"""The engine's live rows: each sequence's KV-cache row, memory-batch row and decode state in step.

n live sequences hold rows 0..n-1 of everything that is per row: sequence i's keys and values
are row i of the `KVCache`, its memory blocks row i of the batch's `MemoryBatch`, and its decode
inputs (last token, position, sampling generator) live on the sequence itself, which is row i of
`sequences`. `add` appends rows and returns their range for prefill; `remove_ended` drops the
rows whose sequence ended and fills the holes with the live rows past the end, moving each one's
cache row, memory row and sequence by the same moves, so the rows stay contiguous and every step
runs on a view of the first n. One object does all three, so they cannot fall out of step (the
idea of vLLM's `InputBatch`, which owns and condenses its per-request rows the same way).

The memory of every row is built the first time a step asks for it and kept, compacted with the
cache's moves when rows leave (one row's copy instead of a rebuild of all of them), and dropped
as soon as rows join, before anything is rebuilt: a batch's memory (max_batch paths) is never
held twice. Rows that join an idle batch are the whole batch, so their prefill builds the memory
that the decode steps then reuse.

A failed sequence's cache row may hold NaN: it is zeroed where it is before any row moves, since
attention multiplies even masked values and 0 * NaN is NaN.

Only the model thread calls these methods. The row list changes under `lock`, since the event
loop reads how many rows there are and whether their sequences have ended.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Generic, Protocol, TypeVar

import torch
from torch import Tensor

from server.engine.sampling import SamplingParams, make_generator
from server.model.config import AnchorConfig
from server.model.kv_cache import KVCache
from server.model.memory import MemoryBlock
from server.model.memory_batch import MemoryBatch, build_memory_batch, compact_rows


class Row(Protocol):
    """What the batch reads and writes of a sequence (the engine's `EngineSequence`)."""

    prompt: list[int]
    params: SamplingParams
    memory: list[MemoryBlock]
    position: int  # tokens written in its cache row
    last: int  # the last token sampled: the input of the next decode step
    generator: torch.Generator | None
    ended: bool
    failed: bool  # ended with an error: its cache row may hold NaN


S = TypeVar("S", bound=Row)


class LiveBatch(Generic[S]):
    """The live sequences in row order, with their KV-cache rows and their memory batch."""

    def __init__(
        self,
        config: AnchorConfig,
        *,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        lock: AbstractContextManager[object] | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.dtype, self.device = dtype, torch.device(device)
        self.cache = KVCache(
            config, batch_size=max_batch, max_len=max_len, dtype=dtype, device=device
        )
        self._lock = lock if lock is not None else threading.Lock()
        self._rows: list[S] = []
        self._memory: MemoryBatch | None = None
        self._memory_built = False  # _memory is every row's (None then: no row has memory)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def sequences(self) -> Sequence[S]:
        """The live sequences, sequence i in row i (the batch's own list: read, never change)."""
        return self._rows

    # -- rows joining and leaving ---------------------------------------------------------------

    def add(self, seqs: Sequence[S]) -> tuple[int, int]:
        """Append sequences as rows lo..hi-1 (returned), ready for their prefill."""
        lo, hi = len(self._rows), len(self._rows) + len(seqs)
        assert hi <= self.max_batch, f"{hi} rows in a batch of {self.max_batch}"
        for s in seqs:
            s.generator = make_generator(s.params.seed, self.device)
            s.position = len(s.prompt)  # what the prefill writes
        self._drop_memory()
        with self._lock:
            self._rows.extend(seqs)
        return lo, hi

    def remove_ended(self) -> list[S]:
        """Drop the rows whose sequence has ended (returned, in row order).

        Each hole below the new end takes a live row from past it: its cache row, memory row and
        sequence move together. A failed row is zeroed first, where it is.
        """
        rows = self._rows
        ended = [i for i, s in enumerate(rows) if s.ended]
        if not ended:
            return []
        for i in ended:
            if rows[i].failed:
                self._scrub(i)
        keep = len(rows) - len(ended)
        holes = [i for i in ended if i < keep]
        movers = [i for i in range(keep, len(rows)) if not rows[i].ended]
        moves = list(zip(movers, holes, strict=True))  # (src, dst): no src is ever a dst
        for src, dst in moves:
            self.cache.move_row(src, dst, rows[src].position)
        removed = [rows[i] for i in ended]
        with self._lock:
            for src, dst in moves:
                rows[dst] = rows[src]
            del rows[keep:]
        if self._memory is not None and keep > 0:
            self._memory = compact_rows(self._memory, moves, keep)  # rows follow the cache
        elif self._memory is not None:
            self._drop_memory()
        # Built and None: no row had memory, so none of the rest has.
        return removed

    def clear(self) -> list[S]:
        """Empty the batch; returns its sequences in row order. The cache keeps what it holds."""
        self._drop_memory()
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    def reset(self) -> None:
        """Empty the batch after a failed step and zero the whole cache: which rows the failure
        left NaN in is unknown, and none is trusted by its next sequence."""
        self.clear()
        self.cache.k.zero_()
        self.cache.v.zero_()

    # -- a step's inputs ------------------------------------------------------------------------

    def prompt_inputs(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Tokens and positions [hi - lo, T] of rows lo..hi-1's prompts, right-padded to T."""
        seqs = self._rows[lo:hi]
        T = max(len(s.prompt) for s in seqs)
        tokens = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt)] = torch.tensor(s.prompt)
        positions = torch.arange(T, device=self.device).expand(len(seqs), T)  # [k, T]
        return tokens.to(self.device), positions

    def decode_inputs(self) -> tuple[Tensor, Tensor]:
        """Every row's last token and the position it goes to, [n, 1] each: a decode step."""
        tokens = torch.tensor([[s.last] for s in self._rows], device=self.device)  # [n, 1]
        positions = torch.tensor([[s.position] for s in self._rows], device=self.device)
        return tokens, positions  # [n, 1]

    def advance(self) -> None:
        """A decode step wrote one more position in every row."""
        for s in self._rows:
            s.position += 1

    def cache_rows(self, lo: int, hi: int) -> KVCache:
        """Rows lo..hi-1 of the KV cache (a view: a forward pass writes through it)."""
        return self.cache.rows(lo, hi)

    def memory(self, lo: int, hi: int) -> MemoryBatch | None:
        """The memory of rows lo..hi-1; None when none of them has any.

        Every row's is kept for the steps that follow; any other range's (new rows' prefill
        beside older rows, a row run alone) is built for the caller only.
        """
        if (lo, hi) != (0, len(self._rows)):
            return self._build(self._rows[lo:hi])
        if not self._memory_built:
            assert self._memory is None  # dropped when the rows changed: never held twice
            self._memory = self._build(self._rows)
            self._memory_built = True
        return self._memory

    # -- inside ---------------------------------------------------------------------------------

    def _build(self, seqs: Sequence[S]) -> MemoryBatch | None:
        return build_memory_batch([s.memory for s in seqs], dtype=self.dtype, device=self.device)

    def _drop_memory(self) -> None:
        # Freed now, before any new one is built.
        self._memory, self._memory_built = None, False

    def _scrub(self, row: int) -> None:
        """Zero a cache row: whatever sequence gets it next attends over its stale positions."""
        view = self.cache.rows(row, row + 1)
        view.k.zero_()
        view.v.zero_()
