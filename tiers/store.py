"""`TieredStore`: read-through fetching of memory blocks across RAM, flash, disk and cloud.

A block's chain is the RAM cache, then the cache tiers (capped tiers in front of slower homes),
then the tiers its level is placed on (home first, then replicas). A read walks the chain until
a tier returns bytes that match the block's expected size and sha256; the verified bytes are
decoded on the tier's worker thread, cached in RAM, and promoted into the cache tiers the read
passed over (and written back over any corrupt copy found on the way), in the background.

Every fetch has a deadline; a tier that fails repeatedly is cut off by its circuit breaker and
probed back; a failure of one key on one tier is remembered for `failure_ttl_s` only. Fetching a
prompt's path reads all its levels concurrently, and never raises: each block's outcome is
reported in its `Fetched`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tiers.base import Tier, to_bytes
from tiers.breaker import CircuitBreaker
from tiers.cache import BlockCache
from tiers.capped import CappedTier
from tiers.errors import (
    BlockNotFoundError,
    CircuitOpenError,
    ConfigError,
    FetchFailedError,
    FetchTimeoutError,
    IntegrityError,
    TierError,
    TierUnavailableError,
)
from tiers.keys import BlockKey
from tiers.metrics import StoreMetrics, StoreSnapshot

log = logging.getLogger(__name__)
V = TypeVar("V")
RAM = "ram"


@dataclass(frozen=True, slots=True)
class BlockDigest:
    """What a block must be: its size and sha256 (hex), from the bank manifest."""

    nbytes: int
    sha256: str


class BlockCodec(Protocol[V]):
    """Turns verified bytes into the value the cache holds, on the tier's worker thread."""

    def decode(self, view: memoryview) -> V: ...

    def nbytes(self, value: V) -> int: ...


class BytesCodec:
    """The identity codec: blocks stay bytes."""

    def decode(self, view: memoryview) -> bytes:
        return to_bytes(view)

    def nbytes(self, value: bytes) -> int:
        return len(value)


@dataclass(frozen=True, slots=True)
class StorePolicy:
    """Deadlines, breaker and background-write settings. Defaults suit an interactive server."""

    deadline_s: float = 2.0  # a caller's wait for one block, through every tier tried
    # One tier read. It may outlive its caller's deadline so that a late block still lands in
    # the cache for the next prompt; None: 4 x deadline_s.
    tier_timeout_s: float | None = None
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0
    failure_ttl_s: float = 2.0  # how long a key's failure on a tier is remembered
    max_background_writes: int = 64  # promotions in flight; beyond, promotions are skipped
    promote: bool = True

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ConfigError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.tier_timeout_s is not None and self.tier_timeout_s <= 0:
            raise ConfigError(f"tier_timeout_s must be > 0, got {self.tier_timeout_s}")
        if self.failure_ttl_s < 0:
            raise ConfigError(f"failure_ttl_s must be >= 0, got {self.failure_ttl_s}")

    @property
    def tier_read_timeout_s(self) -> float:
        return self.tier_timeout_s if self.tier_timeout_s is not None else 4 * self.deadline_s


@dataclass(frozen=True, slots=True)
class StoredBlock(Generic[V]):
    """A decoded block in the RAM cache, with the tier it was read from."""

    value: V
    nbytes: int
    source: str


@dataclass(frozen=True, slots=True)
class Fetched(Generic[V]):
    """The outcome of fetching one block. `value` is None exactly when `error` is set."""

    key: BlockKey
    value: V | None
    tier: str | None  # the tier that served it ("ram" for a cache hit); None on failure
    cached: bool
    seconds: float
    error: TierError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Walk:
    """What one load saw on its way down the chain."""

    errors: list[TierError] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    passed_over: list[str] = field(default_factory=list)  # cache tiers that missed
    corrupt: list[str] = field(default_factory=list)


class TieredStore(Generic[V]):
    """Read-through, verified, deadline-bounded block fetching over a set of tiers."""

    def __init__(
        self,
        tiers: Mapping[str, Tier],
        placement: Mapping[int, Sequence[str]],
        *,
        codec: BlockCodec[V],
        ram: BlockCache[StoredBlock[V]],
        digests: Mapping[str, BlockDigest] | None,
        cache_tiers: Sequence[str] = (),
        policy: StorePolicy | None = None,
        metrics: StoreMetrics | None = None,
    ) -> None:
        self.tiers = dict(tiers)
        self.placement = {int(level): list(names) for level, names in placement.items()}
        self.cache_tiers = list(cache_tiers)
        self.codec = codec
        self.ram = ram
        self.digests = digests
        self.policy = policy or StorePolicy()
        self.metrics = metrics or StoreMetrics()
        self._check_layout()
        self.breakers = {
            name: CircuitBreaker(
                name,
                failure_threshold=self.policy.breaker_failures,
                reset_timeout_s=self.policy.breaker_reset_s,
            )
            for name in self.tiers
        }
        self._recent_failures: dict[tuple[str, str], float] = {}
        self._cost_s: dict[int, float] = {}  # EWMA of load time per level: the refetch cost
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self.metrics.watch(self.snapshot)

    def _check_layout(self) -> None:
        if not self.placement:
            raise ConfigError("placement is empty: give each level a home tier")
        for level, names in self.placement.items():
            if not names:
                raise ConfigError(f"placement of level {level} names no tier")
            for name in names:
                if name not in self.tiers:
                    raise ConfigError(f"placement of level {level} names unknown tier {name!r}")
                if name in self.cache_tiers:
                    raise ConfigError(f"tier {name!r} cannot be both a cache and a home")
        for name in self.cache_tiers:
            if name not in self.tiers:
                raise ConfigError(f"cache tier {name!r} is not a configured tier")
        if RAM in self.tiers:
            raise ConfigError(f"tier name {RAM!r} is reserved for the RAM cache")

    async def open(self) -> None:
        """Rebuild the accounting of capped cache tiers from what they hold."""
        for name in self.cache_tiers:
            tier = self.tiers[name]
            if isinstance(tier, CappedTier):
                await tier.open()

    def chain(self, level: int) -> list[str]:
        """The tiers a block of `level` is read from, in order (after the RAM cache)."""
        try:
            homes = self.placement[level]
        except KeyError:
            raise ConfigError(f"no placement for level {level}") from None
        return [*self.cache_tiers, *homes]

    # -- fetching -------------------------------------------------------------------------------

    async def get(self, key: BlockKey) -> V:
        """The decoded block; raises `TierError` subclasses on failure or deadline."""
        fetched = await self.fetch(key)
        if fetched.error is not None:
            raise fetched.error
        assert fetched.value is not None
        return fetched.value

    async def fetch(self, key: BlockKey, *, deadline_s: float | None = None) -> Fetched[V]:
        """Fetch one block within its deadline. Never raises for tier trouble."""
        if self._closed:
            raise TierUnavailableError(RAM, "store is closed")
        level, skey = str(key.level), str(key)
        deadline = self.policy.deadline_s if deadline_s is None else deadline_s
        started = time.perf_counter()
        if self.digests is not None and skey not in self.digests:
            self.metrics.fetches.labels(level, "not_found").inc()
            return Fetched(key, None, None, False, 0.0, BlockNotFoundError(skey, []))
        hit = self._ram_hit(key, started)
        if hit is not None:
            return hit
        try:
            async with asyncio.timeout(deadline):
                block, cached = await self.ram.get_or_load(
                    skey,
                    lambda: self._load(key),
                    level=key.level,
                    cost_s=self._cost_s.get(key.level, self.policy.deadline_s),
                )
        except TimeoutError:
            elapsed = time.perf_counter() - started
            self.metrics.fetches.labels(level, "timeout").inc()
            return Fetched(key, None, None, False, elapsed, FetchTimeoutError(skey, deadline))
        except BlockNotFoundError as exc:
            self.metrics.fetches.labels(level, "not_found").inc()
            return Fetched(key, None, None, False, time.perf_counter() - started, exc)
        except TierError as exc:
            self.metrics.fetches.labels(level, "failed").inc()
            return Fetched(key, None, None, False, time.perf_counter() - started, exc)
        elapsed = time.perf_counter() - started
        source = RAM if cached else block.source
        self.metrics.fetches.labels(level, "cached" if cached else "loaded").inc()
        self.metrics.fetch_seconds.labels(level, source).observe(elapsed)
        return Fetched(key, block.value, source, cached, elapsed)

    def _ram_hit(self, key: BlockKey, started: float) -> Fetched[V] | None:
        """A RAM-cache hit, answered without a deadline scope or a task (the common case).

        Only verified loads enter the RAM cache, so a hit needs no digest lookup."""
        block = self.ram.get(str(key))
        if block is None:
            return None
        elapsed = time.perf_counter() - started
        level = str(key.level)
        self.metrics.fetches.labels(level, "cached").inc()
        self.metrics.fetch_seconds.labels(level, RAM).observe(elapsed)
        return Fetched(key, block.value, RAM, True, elapsed)

    async def fetch_many(
        self, keys: Sequence[BlockKey], *, deadline_s: float | None = None
    ) -> list[Fetched[V]]:
        """Fetch blocks concurrently (all levels of a path at once); outcomes in key order."""
        if self._closed:
            raise TierUnavailableError(RAM, "store is closed")
        started = time.perf_counter()
        out: list[Fetched[V] | None] = [self._ram_hit(k, started) for k in keys]
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            loaded = await asyncio.gather(
                *(self.fetch(keys[i], deadline_s=deadline_s) for i in missing)
            )
            for i, f in zip(missing, loaded, strict=True):
                out[i] = f
        return [f for f in out if f is not None]

    # -- one load down the chain ----------------------------------------------------------------

    def _consume(
        self, tier: str, skey: str, keep_raw: bool
    ) -> Callable[[memoryview], tuple[V, bytes | None, int]]:
        expected = None if self.digests is None else self.digests[skey]
        codec = self.codec

        def consume(view: memoryview) -> tuple[V, bytes | None, int]:
            # Runs on the tier's worker thread, while the view is valid; hashlib drops the GIL.
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
            return value, (to_bytes(view) if keep_raw else None), view.nbytes

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
        self._recent_failures[(tier, skey)] = now + self.policy.failure_ttl_s

    async def _load(self, key: BlockKey) -> tuple[StoredBlock[V], int]:
        skey = str(key)
        walk = _Walk()
        load_started = time.perf_counter()
        for name in self.chain(key.level):
            walk.tried.append(name)
            result = await self._read_one(name, key, walk)
            if result is None:
                continue
            value, raw, _ = result
            nbytes = self.codec.nbytes(value)
            elapsed = time.perf_counter() - load_started
            prev = self._cost_s.get(key.level)
            self._cost_s[key.level] = elapsed if prev is None else 0.8 * prev + 0.2 * elapsed
            if raw is not None:
                for target in dict.fromkeys([*walk.passed_over, *walk.corrupt]):
                    self._write_back(target, skey, raw)
            return StoredBlock(value, nbytes, name), nbytes
        if not walk.errors:
            raise BlockNotFoundError(skey, walk.tried)
        log.warning("block %s: every tier failed: %s", skey, "; ".join(map(str, walk.errors)))
        raise FetchFailedError(skey, walk.errors)

    async def _read_one(
        self, name: str, key: BlockKey, walk: _Walk
    ) -> tuple[V, bytes | None, int] | None:
        """Read `key` from tier `name`; None (and `walk` updated) when it cannot serve it."""
        skey, level = str(key), str(key.level)
        reads = self.metrics.tier_reads
        if self._recently_failed(name, skey):
            reads.labels(name, level, "skipped").inc()
            walk.errors.append(TierUnavailableError(name, "failed recently; not retried yet"))
            return None
        breaker = self.breakers[name]
        try:
            probe = breaker.before_call()
        except CircuitOpenError as exc:
            reads.labels(name, level, "skipped").inc()
            walk.errors.append(exc)
            return None
        keep_raw = self.policy.promote and bool(walk.passed_over or walk.corrupt)
        started = time.perf_counter()
        try:
            consume = self._consume(name, skey, keep_raw)
            async with asyncio.timeout(self.policy.tier_read_timeout_s):
                result = await self.tiers[name].read(skey, consume)
        except IntegrityError as exc:
            breaker.record_success()  # the tier answered; its copy is bad
            reads.labels(name, level, "corrupt").inc()
            log.error("%s", exc)
            walk.errors.append(exc)
            walk.corrupt.append(name)
            return None
        except TimeoutError:
            breaker.record_failure()
            self._remember_failure(name, skey)
            reads.labels(name, level, "timeout").inc()
            walk.errors.append(TierUnavailableError(name, "read timed out"))
            return None
        except TierError as exc:
            breaker.record_failure()
            self._remember_failure(name, skey)
            reads.labels(name, level, "error").inc()
            walk.errors.append(exc)
            return None
        except asyncio.CancelledError:
            if probe:
                breaker.release_probe()
            raise
        breaker.record_success()
        if result is None:
            reads.labels(name, level, "miss").inc()
            if name in self.cache_tiers:
                walk.passed_over.append(name)
            return None
        reads.labels(name, level, "hit").inc()
        self.metrics.tier_read_seconds.labels(name, level).observe(time.perf_counter() - started)
        self.metrics.tier_read_bytes.labels(name, level).inc(result[2])
        return result

    # -- background writes ----------------------------------------------------------------------

    def _write_back(self, tier: str, skey: str, raw: bytes) -> None:
        """Promote verified bytes into a faster tier, or repair a corrupt copy, off the path."""
        if len(self._background) >= self.policy.max_background_writes or self._closed:
            self.metrics.promotions.labels(tier, "skipped").inc()
            return
        task = asyncio.create_task(self._put_quietly(tier, skey, raw), name=f"promote:{skey}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put_quietly(self, tier: str, skey: str, raw: bytes) -> None:
        try:
            await self.tiers[tier].put(skey, raw)
        except Exception as exc:  # a background write must not die unobserved, whatever failed
            self.metrics.promotions.labels(tier, "error").inc()
            log.warning("could not write block %s to tier %r: %s", skey, tier, exc)
            return
        self.metrics.promotions.labels(tier, "ok").inc()

    async def drain(self) -> None:
        """Wait for the background writes in flight (tests, orderly shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- state ----------------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        capped = {
            name: (t.held_bytes, t.cap_bytes, t.evictions, t.evicted_bytes)
            for name, t in self.tiers.items()
            if isinstance(t, CappedTier)
        }
        return StoreSnapshot(
            cache=self.ram.stats(),
            breakers={name: b.state for name, b in self.breakers.items()},
            capped=capped,
        )

    async def aclose(self) -> None:
        """Cancel loads and background writes, then close every tier."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.ram.aclose()
        await asyncio.gather(*(t.aclose() for t in self.tiers.values()), return_exceptions=True)
