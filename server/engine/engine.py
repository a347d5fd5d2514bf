"""Continuous batching on one model thread, each sequence with its own memory.

Requests wait in a bounded queue; the model thread admits them into free batch slots as soon as
there are any (prefill, first token), and every step decodes one token for every live sequence
in one forward pass, however different their memories (a heterogeneous batch: `MemoryBatch`).
The live sequences are the rows of a `LiveBatch` (`server.engine.batch`): sequence i has row i of
the KV cache and of the memory batch. When a sequence ends (EOS, `max_tokens`, the context, or
its client cancelled) a row from the end moves into its slot, cache, memory and all, so the live
rows stay contiguous and each step runs on a view of the first n rows.

The event loop and the model thread meet in two places only: `submit` appends to the queue under
a condition variable, and the model thread hands each event to the sequence's asyncio queue with
`call_soon_threadsafe`. Token ids, not text: detokenising and stop strings are the caller's job
(`server.engine.text`); a caller that has seen a stop string cancels, which frees the slot at the
next step.

No sequence can fail another. Rows of a batch are computed independently, so a sequence whose
logits are not finite (a corrupt memory block) or cannot be sampled is ended alone with an
`EndEvent("error", message)` (the `Sampler` names its rows); one whose blocks make the batched
forward raise is found by running the batch's rows alone, once, and is ended alone. A failed
sequence's cache row is zeroed before the next sequence gets it (`LiveBatch.remove_ended`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from server.engine.batch import LiveBatch
from server.engine.sampling import Sampler, SamplingParams, prompt_logprobs
from server.engine.threads import usable_cores
from server.model.anchor import Anchor
from server.model.kv_cache import KVCache
from server.model.memory import MemoryBlock

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineOverloadedError(RuntimeError):
    """The queue is full: the caller should answer 429 and retry after `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no more work."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token: int
    logprob: float
    top: list[tuple[int, float]] | None


@dataclass(frozen=True, slots=True)
class PromptEvent:
    """Per prompt token: its logprob given its prefix (None for the first) and alternatives."""

    logprobs: list[tuple[float | None, list[tuple[int, float]]]]


@dataclass(frozen=True, slots=True)
class EndEvent:
    reason: FinishReason
    error: str | None = None


Event = TokenEvent | PromptEvent | EndEvent


@dataclass(eq=False)
class EngineSequence:
    """One sequence: its prompt, sampling, memory, and the events the model thread sends it."""

    prompt: list[int]
    params: SamplingParams
    memory: list[MemoryBlock]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # Model-thread state.
    generated: int = 0
    position: int = 0  # tokens written in the KV cache
    last: int = 0
    generator: torch.Generator | None = None
    ended: bool = False
    failed: bool = False  # ended with an error: its cache row may hold NaN

    def cancel(self) -> None:
        """Stop generating (a client left, or a stop string was seen); idempotent."""
        self.cancelled = True

    def _send(self, event: Event) -> None:
        # A closed event loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def stream(self) -> AsyncIterator[Event]:
        """The events up to and including the `EndEvent`; leaving early cancels the sequence."""
        try:
            while True:
                event = await self.events.get()
                yield event
                if isinstance(event, EndEvent):
                    return
        finally:
            self.cancel()


@dataclass(frozen=True, slots=True)
class EngineStats:
    active: int
    waiting: int
    max_batch: int
    max_queue: int
    steps: int
    tokens: int
    cancelled: int  # sequences ended because their caller cancelled (a client left, a stop)
    errors: int  # sequences ended with an error (the rest of their batch went on)


class Engine:
    """The model thread and its bounded queue."""

    def __init__(
        self,
        model: Anchor,
        *,
        eos_ids: Sequence[int] = (),
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        torch_threads: int | None = None,
    ) -> None:
        param = next(model.parameters())
        self.model = model.eval()
        self.device, self.dtype = param.device, param.dtype
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = max_len or model.config.max_seq_len
        # The model thread's intra-op threads; None: every core this process may run on.
        self.torch_threads = torch_threads or usable_cores()
        self.sampler = Sampler()
        self._cv = threading.Condition()
        self._pending: deque[EngineSequence] = deque()
        # The live sequences; the event loop reads them under _cv, as the batch changes them.
        self._batch: LiveBatch[EngineSequence] = LiveBatch(
            model.config,
            max_batch=max_batch,
            max_len=self.max_len,
            dtype=self.dtype,
            device=self.device,
            lock=self._cv,
        )
        self._closing = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._tokens = 0
        self._cancelled = 0
        self._errors = 0
        self._step_s = 0.05  # EWMA of one decode step: the basis of Retry-After

    # -- the event-loop side --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hmem-model", daemon=True)
            self._thread.start()

    def submit(
        self,
        requests: Sequence[tuple[list[int], SamplingParams, list[MemoryBlock]]],
    ) -> list[EngineSequence]:
        """Queue sequences, all or none; raises `EngineOverloadedError` when they do not fit."""
        loop = asyncio.get_running_loop()
        for prompt, params, _ in requests:
            if not prompt:
                raise ValueError("a prompt needs at least one token")
            if len(prompt) + params.max_tokens > self.max_len:
                raise ValueError(
                    f"{len(prompt)} prompt tokens plus max_tokens {params.max_tokens} exceed "
                    f"the context length {self.max_len}"
                )
        seqs = [EngineSequence(list(p), params, list(m), loop) for p, params, m in requests]
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            # Sequences that have ended but are not retired yet hold no slot for long.
            queued = len(self._pending) + sum(not g.ended for g in self._batch.sequences)
            if queued + len(seqs) > self.max_batch + self.max_queue:
                raise EngineOverloadedError(self.retry_after_s())
            self._pending.extend(seqs)
            self._cv.notify()
        return seqs

    @property
    def cache(self) -> KVCache:
        """The KV cache: one row per batch slot."""
        return self._batch.cache

    @property
    def alive(self) -> bool:
        """Its model thread is running (a health check: a dead thread serves nothing more)."""
        return self._thread is not None and self._thread.is_alive()

    def retry_after_s(self) -> float:
        """A guess at when a slot frees: a typical request's decode steps."""
        return max(1.0, min(60.0, self._step_s * 64))

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                active=len(self._batch),
                waiting=len(self._pending),
                max_batch=self.max_batch,
                max_queue=self.max_queue,
                steps=self._steps,
                tokens=self._tokens,
                cancelled=self._cancelled,
                errors=self._errors,
            )

    async def close(self) -> None:
        """Finish nothing more: end every sequence as cancelled and stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # -- the model thread -----------------------------------------------------------------------

    def _run(self) -> None:
        # Always set: a thread inherits torch's thread count from wherever it was last set in the
        # process, and the serving loop sets 1 for itself (threads.py). Left unset, the model ran
        # on one core: 14 decode tokens/s against 19 on two at the 160M shape (docs/results.md).
        torch.set_num_threads(self.torch_threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closing and not self._pending and not self._batch:
                        self._cv.wait()
                    if self._closing:
                        break
                    room = self.max_batch - len(self._batch)
                    admitted = [
                        self._pending.popleft() for _ in range(min(room, len(self._pending)))
                    ]
                try:
                    self._step(admitted)
                except Exception as exc:  # a bug: fail the live sequences, keep serving
                    log.exception("model step failed")
                    self._fail_all([*self._batch.sequences, *admitted], exc)
        leftover = self._batch.clear()
        with self._cv:
            leftover.extend(self._pending)
            self._pending = deque()
        for g in leftover:
            self._end(g, "cancelled")

    def _step(self, admitted: list[EngineSequence]) -> None:
        admitted = [g for g in admitted if not self._end_if_cancelled(g)]
        if admitted:
            self._prefill(admitted)
        self._retire()
        if self._batch:
            self._decode()
        self._retire()

    def _fail_all(self, seqs: list[EngineSequence], exc: Exception) -> None:
        for g in seqs:
            self._end(g, "error", _failure(exc))
        try:
            self._batch.reset()
        except Exception:  # a broken device: the next step will say so to its own sequences
            log.exception("clearing the KV cache failed")

    def _end(self, g: EngineSequence, reason: FinishReason, error: str | None = None) -> None:
        if not g.ended:
            g.ended = True
            if reason == "cancelled":
                self._cancelled += 1
            elif reason == "error":
                self._errors += 1
                g.failed = True
                log.warning("a sequence ended with an error: %s", error)
            g._send(EndEvent(reason, error))

    def _end_if_cancelled(self, g: EngineSequence) -> bool:
        if g.cancelled:
            self._end(g, "cancelled")
        return g.cancelled

    def _prefill(self, new: list[EngineSequence]) -> None:
        start, stop = self._batch.add(new)
        k = stop - start
        tokens, positions = self._batch.prompt_inputs(start, stop)  # [k, T]

        # Rows that join an idle batch are all of it: the memory their prefill builds is kept
        # for the decode steps (`LiveBatch.memory`).
        def forward(lo: int, hi: int) -> Tensor:
            return self._forward_rows(tokens[lo:hi], positions[lo:hi], start + lo, start + hi)

        logits, errors = self._forward_isolating(k, forward)  # [k, T, V]
        for g, error in zip(new, errors, strict=True):
            if error is not None:
                self._end(g, "error", error)
        if logits is None:
            return
        for i, g in enumerate(new):
            if not g.ended and g.params.echo and g.params.logprobs is not None:
                try:
                    lp = prompt_logprobs(logits[i, : len(g.prompt)], g.prompt, g.params.logprobs)
                except ValueError as exc:  # logits not finite: the sampler would refuse them too
                    self._end(g, "error", str(exc))
                    continue
                g._send(PromptEvent(lp))
        lengths = torch.tensor([len(g.prompt) for g in new], device=self.device)
        last = logits[torch.arange(k, device=self.device), lengths - 1]  # [k, V]
        self._emit(new, last)

    def _decode(self) -> None:
        started = time.perf_counter()
        live = self._batch.sequences
        tokens, positions = self._batch.decode_inputs()  # [n, 1]

        def forward(lo: int, hi: int) -> Tensor:
            return self._forward_rows(tokens[lo:hi], positions[lo:hi], lo, hi)[:, 0]

        logits, errors = self._forward_isolating(len(live), forward)  # [n, V]
        self._batch.advance()
        for g, error in zip(live, errors, strict=True):
            if error is not None:
                self._end(g, "error", error)
        if logits is not None:
            self._emit(live, logits)
        self._steps += 1
        self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - started)

    def _forward_rows(self, tokens: Tensor, positions: Tensor, lo: int, hi: int) -> Tensor:
        """The logits [hi - lo, T, V] of batch rows lo..hi-1 from their tokens and positions
        [hi - lo, T], on their own cache rows and memory."""
        logits: Tensor = self.model(
            tokens,
            positions=positions,
            cache=self._batch.cache_rows(lo, hi),
            memory=self._batch.memory(lo, hi),
        )
        return logits

    def _forward_isolating(
        self, n: int, forward: Callable[[int, int], Tensor]
    ) -> tuple[Tensor | None, list[str | None]]:
        """`forward(lo, hi)` (the logits of rows lo..hi-1) over all n rows; per row if that raises.

        Rows are computed independently, so one that runs alone gets the logits it would get in
        the batch, and a sequence whose blocks break the batch (a malformed block, a mix of
        memory types) is singled out. Returns the logits, NaN in failed rows (None when every
        row failed), and each row's error.
        """
        try:
            return forward(0, n), [None] * n
        except Exception as exc:
            log.exception("a forward pass of %d rows failed", n)
            if n == 1:
                return None, [_failure(exc)]
        rows: list[Tensor | None] = []
        errors: list[str | None] = []
        for i in range(n):
            try:
                rows.append(forward(i, i + 1))
                errors.append(None)
            except Exception as exc:
                log.exception("row %d of the failed forward pass fails alone", i)
                rows.append(None)
                errors.append(_failure(exc))
        like = next((r for r in rows if r is not None), None)
        if like is None:
            return None, errors
        return torch.cat(
            [torch.full_like(like, math.nan) if r is None else r for r in rows]
        ), errors

    def _emit(self, seqs: Sequence[EngineSequence], logits: Tensor) -> None:
        """Sample each sequence's next token from logits [n, V] and send it."""
        result = self.sampler(logits, [g.params for g in seqs], [g.generator for g in seqs])
        ids = result.ids.tolist()
        lps = result.logprobs.tolist()
        eos = torch.isin(result.ids, self.eos).tolist() if self.eos.numel() else [False] * len(ids)
        for i, g in enumerate(seqs):
            if g.ended or g.cancelled:
                continue
            if result.errors[i] is not None:
                self._end(g, "error", result.errors[i])
                continue
            if eos[i] and not g.params.ignore_eos:
                self._end(g, "stop")
                continue
            g.last = ids[i]
            g.generated += 1
            self._tokens += 1
            g._send(TokenEvent(ids[i], lps[i], result.top[i]))
            if g.generated >= g.params.max_tokens or g.position >= self.max_len:
                self._end(g, "length")

    def _retire(self) -> None:
        """Drop ended and cancelled sequences from the batch."""
        for g in self._batch.sequences:
            self._end_if_cancelled(g)
        self._batch.remove_ended()


def _failure(exc: Exception) -> str:
    # The type only: the message may hold internals (shapes, paths) that are the log's business.
    return f"generation failed: {type(exc).__name__}"
