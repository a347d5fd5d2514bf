"""CircuitBreaker state machine, on an injected clock."""

from __future__ import annotations

import pytest

from tiers import BreakerState, CircuitBreaker, CircuitOpenError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_refuses_calls() -> None:
    clock = Clock()
    b = CircuitBreaker("cloud", failure_threshold=3, reset_timeout_s=5, clock=clock)
    for _ in range(2):
        b.before_call()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    b.record_success()  # consecutive: a success resets the count
    for _ in range(3):
        b.record_failure()
    assert b.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        b.before_call()
    assert info.value.retry_in_s == pytest.approx(5)


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = Clock()
    b = CircuitBreaker("cloud", failure_threshold=1, reset_timeout_s=5, clock=clock)
    b.record_failure()
    clock.now += 5
    assert b.state is BreakerState.HALF_OPEN
    b.before_call()  # the probe
    with pytest.raises(CircuitOpenError):
        b.before_call()  # others wait for the probe's verdict
    b.record_success()
    assert b.state is BreakerState.CLOSED
    b.before_call()


def test_a_failed_probe_opens_again_for_a_full_timeout() -> None:
    clock = Clock()
    b = CircuitBreaker("cloud", failure_threshold=1, reset_timeout_s=5, clock=clock)
    b.record_failure()
    clock.now += 6
    b.before_call()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert b.opened_count == 2
    clock.now += 4.9
    assert b.state is BreakerState.OPEN


def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    b = CircuitBreaker("cloud", failure_threshold=1, reset_timeout_s=1, clock=clock)
    b.record_failure()
    clock.now += 1
    b.before_call()
    b.release_probe()
    b.before_call()


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout_s"):
        CircuitBreaker("x", reset_timeout_s=0)


def test_the_failure_that_opens_it_says_so_and_when() -> None:
    clock = Clock()
    b = CircuitBreaker("cloud", failure_threshold=2, reset_timeout_s=5, clock=clock)
    assert b.record_failure() is False
    assert b.opened_at is None
    clock.now += 1
    assert b.record_failure() is True
    assert b.opened_at == 101.0
    assert b.record_failure() is False  # already open: not opened again
    b.record_success()
    assert b.opened_at is None
