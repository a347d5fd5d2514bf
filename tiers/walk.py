"""One load's walk down a block's chain: which tiers are read, hedged reads racing for the first
verified copy, and what a stuck tier costs its breaker.

`TieredStore` owns the RAM cache, the layout and the background writes; for a load it hands the
chain to its `ChainReader`, which admits each tier (failure memory, circuit breaker), reads it
with the bytes verified and decoded on the tier's worker thread, starts a hedge beside a read
still pending after `hedge_after_s`, and records in a `Walk` what the load saw (misses, errors,
corrupt copies) for the store to promote, repair or report. When a caller's deadline passes, the
reads still running are counted against their tiers' breakers (`deadline_passed`). Apart from
the store because this is the part with the concurrency; the store's docstring tells the whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tiers.base import Tier, to_bytes
from tiers.blocks import BlockCodec, BlockDigest
from tiers.breaker import CircuitBreaker
from tiers.errors import CircuitOpenError, IntegrityError, TierError, TierUnavailableError
from tiers.keys import BlockKey
from tiers.metrics import StoreMetrics
from tiers.policy import StorePolicy

# The store's own logger, as before this module was split out of it: filters on it still apply.
log = logging.getLogger("tiers.store")
V = TypeVar("V")
# A deadline noticed later than this (a fraction of it, at least a floor) found the loop starved.
STALL_FRACTION, STALL_FLOOR_S = 0.25, 0.1


@dataclass(eq=False)
class _Read:
    """One tier read of a load."""

    tier: str
    probe: bool  # the breaker's half-open probe
    hedge: bool = False  # started because an earlier read was still pending after hedge_after_s
    late: bool = False  # still running when a caller's deadline passed; counted on the breaker
    started: float = 0.0  # time.perf_counter() when it was sent


_Result = tuple[V, bytes | None, int]  # decoded value, raw bytes kept for writes, size


@dataclass
class Walk:
    """What one load saw on its way down the chain."""

    errors: list[TierError] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    passed_over: list[str] = field(default_factory=list)  # cache tiers that missed
    corrupt: list[str] = field(default_factory=list)
    reading: list[_Read] = field(default_factory=list)  # reads in flight
    hedges: list[_Read] = field(default_factory=list)


class ChainSource(Protocol[V]):
    """What a `ChainReader` reads of its store (`TieredStore` is one): the tiers and their
    breakers, the chains, the codec and digests that verify a read, the policy and metrics."""

    tiers: dict[str, Tier]
    cache_tiers: list[str]
    codec: BlockCodec[V]
    digests: Mapping[str, BlockDigest] | None
    policy: StorePolicy
    metrics: StoreMetrics

    def chain(self, level: int) -> list[str]: ...

    def breaker(self, tier: str) -> CircuitBreaker: ...


class ChainReader(Generic[V]):
    """A store's reads down its chains: admission, verified tier reads, deadline misses.

    Reads the store's tiers, breakers, policy, metrics, codec and digests as they are now (a
    tier added with `add_tier` included); keeps what outlives one read: each key's recent
    failures, when each tier last answered, and the walks of the loads in flight.
    """

    def __init__(self, store: ChainSource[V]) -> None:
        self.store = store
        self._recent_failures: dict[tuple[str, str], float] = {}
        self._walks: dict[str, Walk] = {}  # loads in flight, by block key
        self._answered_at: dict[str, float] = {}  # tier -> last answer (set on worker threads too)

    async def walk_chain(
        self, key: BlockKey, name: str, walk: Walk
    ) -> tuple[str, _Result[V]] | None:
        """The tier that served `key` (stored as `name`) and what it read; None when none did.

        What the load saw on the way is recorded in `walk`."""
        skey = str(key)
        self._walks[skey] = walk
        try:
            return await _Race(self, key, name, walk).run()
        finally:
            if self._walks.get(skey) is walk:
                del self._walks[skey]

    def deadline_passed(
        self, key: BlockKey, *, late_s: float, deadline_s: float
    ) -> tuple[str, ...]:
        """A caller's deadline passed: count the reads still running against their breakers.

        Only on a tier that has answered no read since this one was sent: a tier that answers,
        however slowly (a burst queued on its threads), is not failing, and counting its queue
        would open the breaker of a healthy disk under load. And only when the deadline was
        noticed on time: a loop that woke up far past it was starved itself (a busy machine),
        and cannot tell a hung tier from its own stall.
        """
        walk = self._walks.get(str(key))
        if walk is None:
            return ()
        on_time = late_s <= max(STALL_FRACTION * deadline_s, STALL_FLOOR_S)
        if self.store.policy.count_deadline_misses and on_time:
            for read in walk.reading:
                if read.late or self._answered_at.get(read.tier, 0.0) > read.started:
                    continue
                read.late = True  # its own ending is not counted again
                self.store.metrics.deadline_misses.labels(read.tier, str(key.level)).inc()
                self._record_failure(read.tier, "a read missed its caller's deadline")
        return tuple(dict.fromkeys(walk.corrupt))

    def _record_failure(self, tier: str, why: str) -> None:
        breaker = self.store.breaker(tier)
        if breaker.record_failure():
            log.warning(
                "tier %r: circuit breaker opened (%s); reads refused for %.1f s",
                tier,
                why,
                breaker.reset_timeout_s,
            )

    def _consume(
        self, tier: str, skey: str, keep_raw: Callable[[], bool]
    ) -> Callable[[memoryview], _Result[V]]:
        expected = None if self.store.digests is None else self.store.digests[skey]
        codec, answered_at = self.store.codec, self._answered_at

        def consume(view: memoryview) -> _Result[V]:
            # Runs on the tier's worker thread, while the view is valid; hashlib drops the GIL.
            answered_at[tier] = time.perf_counter()  # when the tier answered, loop stalled or not
            if expected is not None:
                if view.nbytes != expected.nbytes:
                    raise IntegrityError(
                        tier, skey, f"{view.nbytes} bytes, expected {expected.nbytes}"
                    )
                if hashlib.sha256(view).hexdigest() != expected.sha256:
                    raise IntegrityError(tier, skey, "sha256 mismatch")
            try:
                value = codec.decode(view)
            except (ValueError, TypeError) as exc:
                # Verified bytes that do not decode: the bank itself is wrong. Not a tier failure,
                # and never raised out of `fetch`.
                raise IntegrityError(tier, skey, f"cannot decode: {exc}") from exc
            # Keep the bytes for background writes when they are needed, or free (a fresh
            # `bytes` a disk or S3 read made): a hedge may find a corrupt copy after this read.
            free = type(view.obj) is bytes and view.nbytes == len(view.obj)
            raw = to_bytes(view) if free or keep_raw() else None
            return value, raw, view.nbytes

        return consume

    def _recently_failed(self, tier: str, skey: str) -> bool:
        until = self._recent_failures.get((tier, skey))
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._recent_failures[(tier, skey)]
        return False

    def _remember_failure(self, tier: str, skey: str) -> None:
        now = time.monotonic()
        if len(self._recent_failures) > 10_000:
            self._recent_failures = {k: t for k, t in self._recent_failures.items() if t > now}
        self._recent_failures[(tier, skey)] = now + self.store.policy.failure_ttl_s

    def _admit(self, tier: str, key: BlockKey, walk: Walk) -> _Read | None:
        """A read of `key` from `tier`, unless its failure memory or breaker refuses it."""
        skey, level = str(key), str(key.level)
        walk.tried.append(tier)
        if self._recently_failed(tier, skey):
            self.store.metrics.tier_reads.labels(tier, level, "skipped").inc()
            walk.errors.append(TierUnavailableError(tier, "failed recently; not retried yet"))
            return None
        try:
            probe = self.store.breaker(tier).before_call()
        except CircuitOpenError as exc:
            self.store.metrics.tier_reads.labels(tier, level, "skipped").inc()
            walk.errors.append(exc)
            return None
        return _Read(tier, probe)

    async def _read(self, read: _Read, key: BlockKey, name: str, walk: Walk) -> _Result[V] | None:
        """Read `name` from `read.tier`; None (and `walk` updated) when it cannot serve it."""
        store, tier, skey, level = self.store, read.tier, str(key), str(key.level)
        reads, breaker = store.metrics.tier_reads, store.breaker(tier)
        promote = store.policy.promote
        consume = self._consume(
            tier, skey, lambda: promote and bool(walk.passed_over or walk.corrupt)
        )
        walk.reading.append(read)
        read.started = started = time.perf_counter()
        try:
            async with asyncio.timeout(store.policy.tier_read_timeout_s):
                result = await store.tiers[tier].read(name, consume)
        except IntegrityError as exc:
            self._answered_at[tier] = time.perf_counter()
            if not read.late:
                breaker.record_success()  # the tier answered; its copy is bad
            reads.labels(tier, level, "corrupt").inc()
            store.metrics.corrupt.labels(tier, level).inc()
            log.error("%s", exc)
            walk.errors.append(exc)
            walk.corrupt.append(tier)
            return None
        except TimeoutError:
            self._read_failed(read, skey, level, "timeout")
            walk.errors.append(TierUnavailableError(tier, "read timed out"))
            return None
        except TierError as exc:
            self._answered_at[tier] = time.perf_counter()
            self._read_failed(read, skey, level, "error")
            walk.errors.append(exc)
            return None
        except Exception as exc:  # a tier (or a wrapper of one) raised outside its contract
            self._answered_at[tier] = time.perf_counter()
            self._read_failed(read, skey, level, "error")
            walk.errors.append(TierUnavailableError(tier, f"{type(exc).__name__}: {exc}"))
            log.warning("tier %s: unexpected %s reading %s", tier, type(exc).__name__, skey)
            return None
        except asyncio.CancelledError:
            if read.probe and not read.late:
                breaker.release_probe()
            raise
        finally:
            walk.reading.remove(read)
        self._answered_at[tier] = time.perf_counter()
        if not read.late:
            breaker.record_success()
        if result is None:
            reads.labels(tier, level, "miss").inc()
            if tier in store.cache_tiers:
                walk.passed_over.append(tier)
            return None
        reads.labels(tier, level, "hit").inc()
        store.metrics.tier_read_seconds.labels(tier, level).observe(time.perf_counter() - started)
        store.metrics.tier_read_bytes.labels(tier, level).inc(result[2])
        return result

    def _read_failed(self, read: _Read, skey: str, level: str, result: str) -> None:
        if not read.late:  # a late read was counted when the deadline passed
            self._record_failure(read.tier, f"a read ended in {result}")
        self._remember_failure(read.tier, skey)
        self.store.metrics.tier_reads.labels(read.tier, level, result).inc()


class _Race(Generic[V]):
    """One load's reads down its chain, hedged: the first verified copy wins.

    While no other read is pending, the next tier is read inline (no task), under a hedge timer
    when the chain has a later tier; reads started beside it run as tasks. A read that ends
    without the block moves the walk on to the next tier at once.
    """

    def __init__(self, reader: ChainReader[V], key: BlockKey, name: str, walk: Walk) -> None:
        self.reader, self.key, self.name, self.walk = reader, key, name, walk
        self.chain = reader.store.chain(key.level)
        self.hedge_s = reader.store.policy.hedge_delay_s
        self.next = 0  # index in chain of the next tier to admit
        self.pending: dict[asyncio.Task[_Result[V] | None], _Read] = {}
        self.inline = False  # a read is awaited inline and may be interrupted by a winner
        self.timer: asyncio.TimerHandle | None = None

    def admit(self) -> _Read | None:
        while self.next < len(self.chain):
            tier = self.chain[self.next]
            self.next += 1
            read = self.reader._admit(tier, self.key, self.walk)
            if read is not None:
                return read
        return None

    def start(self, *, hedge: bool = False) -> asyncio.Task[_Result[V] | None] | None:
        """The next admitted tier's read as a task beside the others; None at the chain's end."""
        read = self.admit()
        if read is None:
            return None
        read.hedge = hedge
        if hedge:
            self.walk.hedges.append(read)
        coro = self.reader._read(read, self.key, self.name, self.walk)
        task = asyncio.create_task(coro, name=f"read:{read.tier}:{self.name}")
        self.pending[task] = read
        return task

    async def run(self) -> tuple[str, _Result[V]] | None:
        winner: _Read | None = None
        try:
            while True:
                if not self.pending:
                    read = self.admit()
                    if read is None:
                        return None
                    found = await self.read_inline(read)
                    if found is not None:
                        winner = found[0]
                        return winner.tier, found[1]
                    if self.pending:
                        self.start()  # the inline read served nothing: move on
                    continue
                timeout = self.hedge_s if self.next < len(self.chain) else None
                done, _ = await asyncio.wait(
                    self.pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # the hedge timer: read the next tier beside the pending ones
                    self.start(hedge=True)
                    continue
                for task in done:
                    read = self.pending.pop(task)
                    result = task.result()
                    if result is not None:
                        winner = read
                        return read.tier, result
                self.start()
        finally:
            await self.cancel_pending()
            level, hedges = str(self.key.level), self.reader.store.metrics.hedges
            for read in self.walk.hedges:
                hedges.labels(level, "won" if read is winner else "lost").inc()

    async def read_inline(self, read: _Read) -> tuple[_Read, _Result[V]] | None:
        """`read`, awaited without a task; a hedge that wins meanwhile interrupts it."""
        reader = self.reader
        if self.hedge_s is None or self.next >= len(self.chain):
            result = await reader._read(read, self.key, self.name, self.walk)
            return None if result is None else (read, result)
        loop = asyncio.get_running_loop()
        scope = asyncio.timeout(None)
        hedge_s = self.hedge_s

        def settled(task: asyncio.Task[_Result[V] | None]) -> None:
            if not self.inline or task.cancelled() or task.exception() is not None:
                return
            if task.result() is not None:
                self.inline = False
                scope.reschedule(loop.time())  # a hedge won: cancel the inline read now
            elif (after := self.start()) is not None:  # the hedge served nothing: move on
                after.add_done_callback(settled)

        def hedge() -> None:
            task = self.start(hedge=True)
            if task is not None:
                task.add_done_callback(settled)
            if self.inline and self.next < len(self.chain):
                self.timer = loop.call_later(hedge_s, hedge)

        self.inline = True
        self.timer = loop.call_later(hedge_s, hedge)
        try:
            async with scope:
                try:
                    result = await reader._read(read, self.key, self.name, self.walk)
                finally:
                    self.inline = False
                    self.timer.cancel()
        except TimeoutError:
            for task, other in list(self.pending.items()):
                ended = task.done() and not task.cancelled() and task.exception() is None
                won = task.result() if ended else None
                if won is not None:
                    del self.pending[task]
                    return other, won
            raise AssertionError("an inline read was interrupted with no winner") from None
        return None if result is None else (read, result)

    async def cancel_pending(self) -> None:
        """Cancel the reads still running (losers, or the load was cancelled), and let them end."""
        tasks = list(self.pending)
        self.pending.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
