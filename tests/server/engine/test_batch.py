"""The engine's live batch: rows join and leave, and each sequence's KV-cache row, memory row and
decode state stay together.

The tiny random anchor runs real prefill and decode steps on the batch's cache rows and memory,
greedily. The reference for every step is the sequence's tokens so far run alone, without a
cache: after any compaction a sequence must get exactly the logits it gets alone.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import Tensor

from server.engine.batch import LiveBatch
from server.engine.engine import EngineSequence
from server.model.anchor import Anchor
from server.model.memory import FFNBlock, MemoryBlock
from server.model.memory_batch import FFNMemoryBatch, build_memory_batch
from tests.server.engine.engine_helpers import CFG, block, greedy, prompt

Batch = LiveBatch[EngineSequence]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def _inference_mode() -> Iterator[None]:
    # As on the engine's model thread: no autograd graph ties the cache to the memory tensors.
    with torch.inference_mode():
        yield


class Runner:
    """Greedy steps on a batch, remembering each sequence's tokens for the reference."""

    def __init__(self, model: Anchor, loop: asyncio.AbstractEventLoop, max_batch: int) -> None:
        self.model, self.loop = model, loop
        self.batch: Batch = LiveBatch(CFG, max_batch=max_batch, max_len=64, dtype=torch.float32)
        self.tokens: dict[EngineSequence, list[int]] = {}

    def sequence(self, length: int, seed: int, memory: list[MemoryBlock]) -> EngineSequence:
        g = EngineSequence(prompt(length, seed), greedy(32), memory, self.loop)
        self.tokens[g] = list(g.prompt)
        return g

    def prefill(self, seqs: list[EngineSequence]) -> Tensor:
        """Their last prompt position's logits [k, V]."""
        lo, hi = self.batch.add(seqs)
        tokens, positions = self.batch.prompt_inputs(lo, hi)  # [k, T]
        logits = self.model(
            tokens,
            positions=positions,
            cache=self.batch.cache_rows(lo, hi),
            memory=self.batch.memory(lo, hi),
        )  # [k, T, V]
        last = torch.stack([logits[i, len(g.prompt) - 1] for i, g in enumerate(seqs)])
        self._sample(seqs, last)
        return last

    def decode(self) -> Tensor:
        """One step of every row: logits [n, V]."""
        n = len(self.batch)
        tokens, positions = self.batch.decode_inputs()  # [n, 1]
        expected = [len(self.tokens[g]) - 1 for g in self.batch.sequences]
        assert positions[:, 0].tolist() == expected  # each row's next position is its own
        logits = self.model(
            tokens,
            positions=positions,
            cache=self.batch.cache_rows(0, n),
            memory=self.batch.memory(0, n),
        )[:, 0]  # [n, V]
        self.batch.advance()
        self._sample(self.batch.sequences, logits)
        return logits

    def alone(self, g: EngineSequence) -> Tensor:
        """The logits [V] that `g`'s tokens so far give run alone, without a cache."""
        memory = build_memory_batch([g.memory], dtype=torch.float32)
        tokens = torch.tensor([self.tokens[g][:-1]])  # [1, T]: the last one is not run yet
        out: Tensor = self.model(tokens, memory=memory)[0, -1]
        return out

    def check_alone(self, logits: Tensor, seqs: Sequence[EngineSequence] | None = None) -> None:
        """Each row of logits [k, V] is what its sequence (the batch's rows by default) gets
        alone."""
        for g, row in zip(self.batch.sequences if seqs is None else seqs, logits, strict=True):
            torch.testing.assert_close(row, self.alone(g), rtol=1e-4, atol=1e-5)

    def _sample(self, seqs: Sequence[EngineSequence], logits: Tensor) -> None:
        for g, row in zip(seqs, logits, strict=True):
            g.last = int(row.argmax())
            self.tokens[g].append(g.last)


def memories() -> list[list[MemoryBlock]]:
    return [[block(8, seed=1)], [], [block(4, seed=2), block(12, seed=3)], [block(4, seed=4)]]


@pytest.mark.parametrize(
    "leaving",
    [{1, 3}, {4}, {0}, {0, 1, 2, 3}, {1, 2, 3, 4}],
    ids=["holes", "last", "first", "all-but-last", "all-but-first"],
)
def test_after_rows_leave_each_sequence_gets_the_logits_it_gets_alone(
    model: Anchor, loop: asyncio.AbstractEventLoop, leaving: set[int]
) -> None:
    run = Runner(model, loop, max_batch=6)
    mems = memories()
    seqs = [run.sequence(2 + 3 * i, seed=i, memory=mems[i % len(mems)]) for i in range(5)]
    run.check_alone(run.prefill(seqs))
    for _ in range(3):
        run.check_alone(run.decode())
    for i in leaving:
        seqs[i].ended = True
    removed = run.batch.remove_ended()
    assert removed == [seqs[i] for i in sorted(leaving)]
    assert sorted(run.batch.sequences, key=seqs.index) == [
        g for i, g in enumerate(seqs) if i not in leaving
    ]
    for _ in range(3):
        run.check_alone(run.decode())
    # A sequence that joins the compacted batch lines up as well.
    late = [run.sequence(6, seed=9, memory=[block(8, seed=9)])]
    run.check_alone(run.prefill(late), late)
    for _ in range(2):
        run.check_alone(run.decode())


def nan_block(width: int) -> MemoryBlock:
    """A corrupt block: its NaN weights leave NaN keys and values in its sequence's cache row."""
    good = block(width, seed=90)
    assert isinstance(good, FFNBlock)
    return FFNBlock(gate=good.gate, up=good.up, down=torch.full_like(good.down, math.nan))


def test_failed_rows_are_zeroed_wherever_they_are_before_their_rows_are_reused(
    model: Anchor, loop: asyncio.AbstractEventLoop
) -> None:
    """Rows 1 and 3 (the last) fail together: row 3's NaN must not stay behind in row 3 when
    it is moved or dropped, or the sequence that next gets row 3 attends over NaN."""
    run = Runner(model, loop, max_batch=4)
    poisoned = {1, 3}
    seqs = [
        run.sequence(4 + 2 * i, seed=i, memory=[nan_block(4)] if i in poisoned else [])
        for i in range(4)
    ]
    logits = run.prefill(seqs)
    assert torch.isnan(run.batch.cache.k).any()
    for i in poisoned:
        assert torch.isnan(logits[i]).all()
        seqs[i].ended = seqs[i].failed = True
    run.batch.remove_ended()
    assert not torch.isnan(run.batch.cache.k).any()
    assert not torch.isnan(run.batch.cache.v).any()
    # Two short sequences take rows 2 and 3 beside two longer ones: their attention spans
    # positions past their own, where a stale NaN would reach them.
    fresh = [run.sequence(2, seed=20 + i, memory=[block(4, seed=20 + i)]) for i in range(2)]
    run.check_alone(run.prefill(fresh), fresh)
    assert run.batch.sequences[2:] == fresh
    run.check_alone(run.decode())


# -- the memory batch: built once, compacted in place, never held twice ----------------------------


def ffn_memory(batch: Batch) -> FFNMemoryBatch:
    memory = batch.memory(0, len(batch))
    assert isinstance(memory, FFNMemoryBatch)
    return memory


def test_an_idle_batchs_prefill_memory_serves_its_decode_steps_and_is_compacted_in_place(
    model: Anchor, loop: asyncio.AbstractEventLoop
) -> None:
    run = Runner(model, loop, max_batch=4)
    seqs = [run.sequence(3 + i, seed=i, memory=[block(4 + 4 * i, seed=i)]) for i in range(4)]
    run.prefill(seqs)  # rows 0..3 of an empty batch: every row's memory
    built = ffn_memory(run.batch)
    run.decode()
    assert ffn_memory(run.batch) is built
    seqs[1].ended = True
    run.batch.remove_ended()
    compacted = ffn_memory(run.batch)
    assert compacted.gate_up.shape[1] == 3  # [L, B, 2R, d]
    # Row 3's memory was copied into row 1 of the same tensors: nothing was rebuilt.
    assert compacted.gate_up.data_ptr() == built.gate_up.data_ptr()
    run.check_alone(run.decode())


def test_rows_joining_free_the_old_memory_before_a_new_one_is_built(
    model: Anchor, loop: asyncio.AbstractEventLoop
) -> None:
    run = Runner(model, loop, max_batch=4)
    run.prefill([run.sequence(3, seed=0, memory=[block(8, seed=0)])])
    old = weakref.ref(ffn_memory(run.batch).gate_up)
    assert old() is not None
    run.batch.add([run.sequence(4, seed=1, memory=[block(8, seed=1)])])
    assert old() is None  # gone before the prefill builds the new row's memory
    assert ffn_memory(run.batch).gate_up.shape[1] == 2


def test_a_batch_without_memory_has_none_and_keeps_none_as_rows_leave(
    model: Anchor, loop: asyncio.AbstractEventLoop
) -> None:
    run = Runner(model, loop, max_batch=3)
    seqs = [run.sequence(3 + i, seed=i, memory=[]) for i in range(3)]
    run.prefill(seqs)
    assert run.batch.memory(0, 3) is None
    seqs[0].ended = True
    run.batch.remove_ended()
    assert run.batch.memory(0, 2) is None
    run.check_alone(run.decode())


# -- emptying ---------------------------------------------------------------------------------


def test_clear_returns_the_rows_in_order_and_reset_also_zeroes_the_cache(
    model: Anchor, loop: asyncio.AbstractEventLoop
) -> None:
    run = Runner(model, loop, max_batch=3)
    seqs = [run.sequence(3, seed=i, memory=[block(4, seed=i)]) for i in range(3)]
    run.prefill(seqs)
    assert run.batch.clear() == seqs
    assert len(run.batch) == 0
    assert run.batch.cache.k.any()  # a clean stop: the rows' next sequences overwrite them
    run.prefill(seqs[:2])
    run.batch.reset()
    assert len(run.batch) == 0
    assert not run.batch.cache.k.any()
    assert not run.batch.cache.v.any()
    # The batch serves again, from row 0.
    fresh = [run.sequence(5, seed=7, memory=[block(4, seed=7)])]
    assert run.batch.add(fresh) == (0, 1)
