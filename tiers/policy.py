"""`StorePolicy`: how long a fetch may take, when a tier is given up on, and when reads are hedged.

One frozen settings object, checked on construction, that `TieredStore` and its chain walk
(`tiers.walk`) read; `tiers.config` builds it from a deployment's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tiers.errors import ConfigError

HEDGE_FRACTION = 0.25  # hedge_after_s = "auto": this fraction of deadline_s


@dataclass(frozen=True, slots=True)
class StorePolicy:
    """Deadlines, breaker, hedging and background-write settings. Defaults suit a server."""

    deadline_s: float = 2.0  # a caller's wait for one block, through every tier tried
    # One tier read. It may outlive its caller's deadline so that a late block still lands in
    # the cache for the next prompt; None: 4 x deadline_s.
    tier_timeout_s: float | None = None
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0
    failure_ttl_s: float = 2.0  # how long a key's failure on a tier is remembered
    max_background_writes: int = 64  # promotions and repairs in flight; beyond, they are skipped
    promote: bool = (
        True  # write verified blocks into cache tiers that missed and over corrupt copies
    )
    # A read still pending this long starts the next tier of its chain (a replica, the origin)
    # beside it; the first verified copy wins. "auto": HEDGE_FRACTION x deadline_s; None: never.
    hedge_after_s: float | Literal["auto"] | None = "auto"
    # A tier read still running when its caller's deadline passes counts against the tier's
    # breaker then, so a hung tier opens within about breaker_failures deadlines, not timeouts.
    count_deadline_misses: bool = True

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ConfigError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.tier_timeout_s is not None and self.tier_timeout_s <= 0:
            raise ConfigError(f"tier_timeout_s must be > 0, got {self.tier_timeout_s}")
        if self.failure_ttl_s < 0:
            raise ConfigError(f"failure_ttl_s must be >= 0, got {self.failure_ttl_s}")
        hedge = self.hedge_after_s
        if hedge is not None and hedge != "auto" and (isinstance(hedge, str) or hedge <= 0):
            raise ConfigError(f'hedge_after_s must be > 0, "auto" or None, got {hedge!r}')

    @property
    def tier_read_timeout_s(self) -> float:
        return self.tier_timeout_s if self.tier_timeout_s is not None else 4 * self.deadline_s

    @property
    def hedge_delay_s(self) -> float | None:
        """Seconds a read may be pending before the next tier is read beside it; None: never."""
        if self.hedge_after_s == "auto":
            return HEDGE_FRACTION * self.deadline_s
        return self.hedge_after_s
