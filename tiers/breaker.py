"""`CircuitBreaker`: stop sending reads to a tier that keeps failing, and probe it back.

Closed: calls go through; `failure_threshold` consecutive failures open it. Open: calls are
refused at once (`CircuitOpenError`) for `reset_timeout_s`. Half-open: one probe call goes
through; its success closes the breaker, its failure opens it again. State changes are computed
from the clock when asked, so nothing polls. What counts as a failure is the caller's choice: the
store records errors, tier timeouts, and reads still running when a caller's deadline passes.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from tiers.errors import CircuitOpenError


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        tier: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if reset_timeout_s <= 0:
            raise ValueError(f"reset_timeout_s must be > 0, got {reset_timeout_s}")
        self.tier = tier
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self.reset_timeout_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def opened_at(self) -> float | None:
        """The clock's time when the breaker last opened; None while it is closed."""
        return self._opened_at

    def before_call(self) -> bool:
        """Raise `CircuitOpenError` unless a call may go to the tier now; True for a probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True  # this caller is the probe; others wait for its verdict
            return True
        assert self._opened_at is not None
        retry_in = max(0.0, self._opened_at + self.reset_timeout_s - self._clock())
        raise CircuitOpenError(self.tier, retry_in)

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> bool:
        """Count a failure; True when it opened the breaker (so the caller can say so, once)."""
        self._failures += 1
        if self._probing or (self._opened_at is None and self._failures >= self.failure_threshold):
            self.opened_count += 1
            self._opened_at = self._clock()
            self._probing = False
            return True
        return False

    def release_probe(self) -> None:
        """The probe ended with neither success nor failure (cancelled): let another probe."""
        self._probing = False
