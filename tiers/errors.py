"""The exception tree of `tiers`: every failure a caller can tell apart.

SDK and OS errors are wrapped at the tier boundary (`raise ... from exc`) so that callers never
depend on boto3, lmdb or errno details, and so that no message carries a credential or a host
path the caller did not already know.
"""

from __future__ import annotations


class TierError(Exception):
    """Base class of every error raised by `tiers`."""


class InvalidKeyError(TierError, ValueError):
    """A block key failed validation before any tier saw it (bad input: a 400 upstream)."""


class ConfigError(TierError, ValueError):
    """Store or tier settings are inconsistent; the message says which field to fix."""


class TierUnavailableError(TierError):
    """A tier could not answer: I/O error, connection refused, timeout, throttling.

    These count against the tier's circuit breaker.
    """

    def __init__(self, tier: str, message: str) -> None:
        super().__init__(f"tier {tier!r}: {message}")
        self.tier = tier


class TierFullError(TierError):
    """A write did not fit: LMDB map full, disk full. Raise the tier's size, or lower its cap."""

    def __init__(self, tier: str, message: str) -> None:
        super().__init__(f"tier {tier!r} is full: {message}")
        self.tier = tier


class CircuitOpenError(TierUnavailableError):
    """The tier's circuit breaker is open: the read was not attempted."""

    def __init__(self, tier: str, retry_in_s: float) -> None:
        super().__init__(tier, f"circuit open, next probe in {retry_in_s:.2f}s")
        self.retry_in_s = retry_in_s


class IntegrityError(TierError):
    """Bytes read from a tier do not match the expected size or sha256. Never returned."""

    def __init__(self, tier: str, key: str, message: str) -> None:
        super().__init__(f"block {key!r} from tier {tier!r} failed verification: {message}")
        self.tier = tier
        self.key = key


class BlockNotFoundError(TierError, LookupError):
    """No tier on the block's chain holds it."""

    def __init__(self, key: str, tried: list[str]) -> None:
        where = f"in tiers {tried}" if tried else "in the bank's manifest"
        super().__init__(f"block {key!r} not found {where}")
        self.key = key
        self.tried = tried


class FetchTimeoutError(TierError, TimeoutError):
    """A fetch did not finish within its deadline. The read may still complete and be cached."""

    def __init__(self, key: str, deadline_s: float) -> None:
        super().__init__(f"block {key!r} not fetched within {deadline_s * 1e3:.0f} ms")
        self.key = key
        self.deadline_s = deadline_s


class FetchFailedError(TierError):
    """Every tier on the block's chain failed (unavailable, open breaker, or corrupt copy)."""

    def __init__(self, key: str, causes: list[TierError]) -> None:
        detail = "; ".join(str(c) for c in causes) or "no tier could be read"
        super().__init__(f"block {key!r} could not be fetched: {detail}")
        self.key = key
        self.causes = causes


class CorruptBlockError(FetchFailedError):
    """No tier served a good copy, and at least one held a copy that failed verification.

    The block is not unavailable but bad where it was found: re-push it (`hmem bank push`), or
    let the store repair it from a good copy once one can be read. `corrupt` names the tiers
    whose copy failed, in chain order.
    """

    def __init__(self, key: str, causes: list[TierError]) -> None:
        super().__init__(key, causes)
        bad = (c.tier for c in causes if isinstance(c, IntegrityError))
        self.corrupt: tuple[str, ...] = tuple(dict.fromkeys(bad))
