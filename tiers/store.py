"""`TieredStore`: read-through fetching of memory blocks across RAM, flash, disk and cloud.

A block's chain is the RAM cache, then the cache tiers (capped tiers in front of slower homes),
then the tiers its level is placed on (home first, then replicas, then any tier added with
`add_tier`, such as the bank directory as a read-only origin). In every tier a block's copy is
named after its content (`tiers.keys.storage_key`), so a copy left by another build is never read;
the RAM cache and every caller speak of the logical `BlockKey`. A read walks the chain until a
tier returns bytes that match the block's expected size and sha256; the verified bytes are
decoded on the tier's worker thread, cached in RAM, promoted into the cache tiers the read passed
over, and written over any corrupt copy found on the way (a repair), in the background. Corrupt
copies are reported in `Fetched.corrupt`; a block with no good copy anywhere fails with
`CorruptBlockError` and is listed by `unrepaired()` until a good copy is served.

Every fetch has a deadline. A tier that fails, or is still reading when a caller's deadline
passes without having answered any read meanwhile, counts against its circuit breaker; an open
breaker stops reads to it until a probe succeeds. A read still pending after `hedge_after_s`
starts the next tier's read beside it (a hedge); the first verified copy wins and the others are
cancelled. A failure of one key on one tier is remembered for `failure_ttl_s` only. Fetching a
prompt's path reads all its levels concurrently, and never raises: each block's outcome is
reported in its `Fetched`.

The walk down a chain (admission, hedged reads, deadline misses) is `tiers.walk`; the values the
store speaks are `tiers.blocks`, its settings `tiers.policy`. This module keeps the API, the
layout, the RAM cache's loader and the background writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Generic, TypeVar

from tiers.base import Tier
from tiers.blocks import BlockCodec, BlockDigest, BytesCodec, Fetched, StoredBlock
from tiers.breaker import BreakerState, CircuitBreaker
from tiers.cache import BlockCache, CacheStats
from tiers.capped import CappedTier
from tiers.errors import (
    BlockNotFoundError,
    ConfigError,
    CorruptBlockError,
    FetchFailedError,
    FetchTimeoutError,
    TierError,
    TierUnavailableError,
)
from tiers.keys import BlockKey, storage_key
from tiers.metrics import StoreMetrics, StoreSnapshot
from tiers.policy import StorePolicy
from tiers.walk import ChainReader, Walk

# The values and policy the store speaks live in tiers.blocks and tiers.policy; still exported here.
__all__ = [
    "BlockCodec",
    "BlockDigest",
    "BytesCodec",
    "Fetched",
    "StorePolicy",
    "StoredBlock",
    "TieredStore",
]

log = logging.getLogger(__name__)
V = TypeVar("V")
RAM = "ram"


def _declares_read_only(tier: Tier) -> bool:
    """Whether `tier`, or a tier it wraps, says `read_only = True`."""
    t: object = tier
    while t is not None:
        if getattr(t, "read_only", False) is True:
            return True
        t = getattr(t, "inner", None)
    return False


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
        self.read_only = {name for name, t in self.tiers.items() if _declares_read_only(t)}
        self.codec = codec
        self._ram = ram
        self.digests = digests
        self.policy = policy or StorePolicy()
        self.metrics = metrics or StoreMetrics()
        self._check_layout()
        self._breakers = {name: self._breaker(name) for name in self.tiers}
        self._cost_s: dict[int, float] = {}  # EWMA of load time per level: the refetch cost
        self._reader = ChainReader(self)
        self._unrepaired: dict[int, set[BlockKey]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self.metrics.watch(self.snapshot)

    def _breaker(self, name: str) -> CircuitBreaker:
        p = self.policy
        return CircuitBreaker(
            name, failure_threshold=p.breaker_failures, reset_timeout_s=p.breaker_reset_s
        )

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
            if name in self.read_only:
                raise ConfigError(f"cache tier {name!r} is read-only: promotion writes a cache")
        if RAM in self.tiers:
            raise ConfigError(f"tier name {RAM!r} is reserved for the RAM cache")

    def add_tier(
        self, name: str, tier: Tier, *, levels: Iterable[int], read_only: bool = False
    ) -> None:
        """Read `tier` last for each of `levels`, after their homes and replicas.

        The server adds the bank directory so: the origin of every level, which repairs copy
        from. The store never writes a read-only tier (`read_only=True`, or a tier that says
        `read_only = True`); a corrupt copy there is reported and left.
        """
        if name == RAM or name in self.tiers:
            raise ConfigError(f"tier name {name!r} is taken")
        wanted = sorted(set(levels))
        if not wanted or wanted[0] < 1:
            raise ConfigError(f"tier {name!r}: give the levels (from 1) it serves, got {wanted}")
        self.tiers[name] = tier
        self._breakers[name] = self._breaker(name)
        if read_only or _declares_read_only(tier):
            self.read_only.add(name)
        for level in wanted:
            self.placement.setdefault(level, []).append(name)

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

    def storage_name(self, key: BlockKey) -> str:
        """The name of `key`'s copy in every tier: content-suffixed when the store has digests."""
        if self.digests is None:
            return str(key)
        return storage_key(key, self.digests[str(key)].sha256)

    def unrepaired(self) -> dict[int, set[BlockKey]]:
        """Blocks, by level, whose last load found corrupt copies and no good one."""
        return {level: set(keys) for level, keys in self._unrepaired.items() if keys}

    def breaker(self, tier: str) -> CircuitBreaker:
        """The circuit breaker of `tier` (KeyError for a tier the store does not have)."""
        return self._breakers[tier]

    def breaker_states(self) -> dict[str, BreakerState]:
        """Every tier's breaker state, by tier name."""
        return {name: b.state for name, b in self._breakers.items()}

    # -- the RAM cache --------------------------------------------------------------------------

    def cache_stats(self) -> CacheStats:
        """The RAM cache's bytes, capacity, hits, misses and evictions."""
        return self._ram.stats()

    def cached_keys(self) -> list[str]:
        """The block keys the RAM cache holds now (a snapshot: evicting while iterating is safe)."""
        return list(self._ram.keys())

    def evict(self, key: BlockKey | str) -> bool:
        """Drop `key` from the RAM cache (a block that must not be served from RAM again, e.g.
        blocked); whether it was held. Its tier copies are untouched."""
        return bool(self._ram.discard(str(key)))

    def clear_cache(self) -> None:
        """Drop every block from the RAM cache (benches: measure cold reads)."""
        self._ram.clear()

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
                block, cached = await self._ram.get_or_load(
                    skey,
                    lambda: self._load(key),
                    level=key.level,
                    cost_s=self._cost_s.get(key.level, self.policy.deadline_s),
                )
        except TimeoutError:
            elapsed = time.perf_counter() - started
            self.metrics.fetches.labels(level, "timeout").inc()
            corrupt = self._reader.deadline_passed(
                key, late_s=elapsed - deadline, deadline_s=deadline
            )
            error = FetchTimeoutError(skey, deadline)
            return Fetched(key, None, None, False, elapsed, error, corrupt)
        except BlockNotFoundError as exc:
            self.metrics.fetches.labels(level, "not_found").inc()
            return Fetched(key, None, None, False, time.perf_counter() - started, exc)
        except CorruptBlockError as exc:
            self.metrics.fetches.labels(level, "corrupt").inc()
            elapsed = time.perf_counter() - started
            return Fetched(key, None, None, False, elapsed, exc, exc.corrupt)
        except TierError as exc:
            self.metrics.fetches.labels(level, "failed").inc()
            return Fetched(key, None, None, False, time.perf_counter() - started, exc)
        elapsed = time.perf_counter() - started
        source = RAM if cached else block.source
        self.metrics.fetches.labels(level, "cached" if cached else "loaded").inc()
        self.metrics.fetch_seconds.labels(level, source).observe(elapsed)
        corrupt = () if cached else block.corrupt
        return Fetched(key, block.value, source, cached, elapsed, None, corrupt)

    def _ram_hit(self, key: BlockKey, started: float) -> Fetched[V] | None:
        """A RAM-cache hit, answered without a deadline scope or a task (the common case).

        Only verified loads enter the RAM cache, so a hit needs no digest lookup."""
        block = self._ram.get(str(key))
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

    async def _load(self, key: BlockKey) -> tuple[StoredBlock[V], int]:
        """The RAM cache's loader: walk `key`'s chain (`tiers.walk`), then promote and repair."""
        skey = str(key)
        name = self.storage_name(key)
        walk = Walk()
        load_started = time.perf_counter()
        found = await self._reader.walk_chain(key, name, walk)
        corrupt = tuple(dict.fromkeys(walk.corrupt))
        if found is None:
            if corrupt:
                self._unrepaired.setdefault(key.level, set()).add(key)
                log.error("block %s: no good copy in any tier; corrupt in %s", skey, corrupt)
                raise CorruptBlockError(skey, walk.errors)
            if not walk.errors:
                raise BlockNotFoundError(skey, walk.tried)
            log.warning("block %s: every tier failed: %s", skey, "; ".join(map(str, walk.errors)))
            raise FetchFailedError(skey, walk.errors)
        source, (value, raw, _) = found
        nbytes = self.codec.nbytes(value)
        elapsed = time.perf_counter() - load_started
        prev = self._cost_s.get(key.level)
        self._cost_s[key.level] = elapsed if prev is None else 0.8 * prev + 0.2 * elapsed
        for target in dict.fromkeys(walk.passed_over):
            self._write_back(target, key, name, raw, source=source, repair=False)
        for target in corrupt:
            self._write_back(target, key, name, raw, source=source, repair=True)
        served_again = self._unrepaired.get(key.level)
        if served_again is not None and key in served_again:
            served_again.discard(key)
            log.warning("block %s: a verified copy was served again (from %r)", skey, source)
        return StoredBlock(value, nbytes, source, corrupt), nbytes

    # -- background writes ----------------------------------------------------------------------

    def _write_back(
        self,
        target: str,
        key: BlockKey,
        name: str,
        raw: bytes | None,
        *,
        source: str,
        repair: bool,
    ) -> None:
        """Promote verified bytes into a cache tier, or repair a corrupt copy, off the path."""
        counter = self.metrics.repairs if repair else self.metrics.promotions
        if not repair and not self.policy.promote:
            return
        why = None
        if target in self.read_only:
            why = "the tier is read-only"
        elif not self.policy.promote:
            why = "writes are off (promote = false)"
        elif raw is None:
            why = "no verified bytes were kept"
        elif self._closed or len(self._background) >= self.policy.max_background_writes:
            why = "too many background writes in flight"
        if why is not None or raw is None:
            counter.labels(target, "skipped").inc()
            if repair:
                log.warning("block %s: corrupt copy in tier %r not repaired: %s", key, target, why)
            return
        put = self._put_quietly(target, key, name, raw, repair_from=source if repair else None)
        task = asyncio.create_task(put, name=f"write:{target}:{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put_quietly(
        self, tier: str, key: BlockKey, name: str, raw: bytes, *, repair_from: str | None
    ) -> None:
        counter = self.metrics.promotions if repair_from is None else self.metrics.repairs
        try:
            await self.tiers[tier].put(name, raw)
        except Exception as exc:  # a background write must not die unobserved, whatever failed
            counter.labels(tier, "error").inc()
            log.warning("could not write block %s to tier %r: %s", key, tier, exc)
            return
        counter.labels(tier, "ok").inc()
        if repair_from is not None:
            log.warning(
                "block %s: repaired the corrupt copy in tier %r from tier %r",
                key,
                tier,
                repair_from,
            )

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
            cache=self._ram.stats(),
            breakers={name: b.state for name, b in self._breakers.items()},
            capped=capped,
            unrepaired={level: len(keys) for level, keys in self._unrepaired.items()},
        )

    async def aclose(self) -> None:
        """Cancel loads and background writes, then close every tier."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)
        await self._ram.aclose()
        await asyncio.gather(*(t.aclose() for t in self.tiers.values()), return_exceptions=True)
