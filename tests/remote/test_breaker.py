"""The circuit breaker on an injected clock: exact transitions, one log line per state change."""

from __future__ import annotations

import logging

import pytest

from kvtier.tiers.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, **kw: object) -> CircuitBreaker:
    return CircuitBreaker(
        "test store",
        failure_threshold=3,
        backoff_initial_s=1.0,
        backoff_max_s=4.0,
        jitter=0.0,
        clock=clock,
        **kw,
    )  # type: ignore[arg-type]


def test_opens_after_threshold_then_probes_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    opened: list[int] = []
    b = make(clock, on_open=lambda: opened.append(1))
    caplog.set_level(logging.DEBUG, logger="kvtier.tiers.breaker")
    for _ in range(2):
        assert b.allow()
        b.failure(ConnectionError("refused"))
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    b.failure(ConnectionError("refused"))
    assert b.state is BreakerState.OPEN and opened == [1]
    assert not b.allow() and b.rejected == 1  # no call while open
    clock.t += 0.99
    assert not b.allow()
    clock.t += 0.02
    assert b.allow() and b.state is BreakerState.HALF_OPEN  # the one probe
    assert not b.allow()  # a second caller is refused while the probe is in flight
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow()
    assert b.transitions == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    lines = [r for r in caplog.records if "circuit" in r.getMessage()]
    assert len(lines) == 3  # one line per state change, none per refused call
    assert [r.levelno for r in lines] == [logging.WARNING, logging.DEBUG, logging.INFO]
    assert b.failures == 3


def test_backoff_doubles_up_to_max_and_resets() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(3):
        b.allow()
        b.failure(TimeoutError("slow"))
    waits = []
    for _ in range(4):  # failed probes: 1 -> 2 -> 4 -> 4 (max)
        start = clock.t
        while not b.allow():
            clock.t += 0.25
        waits.append(clock.t - start)
        b.failure(TimeoutError("slow"))
    assert waits == [1.0, 2.0, 4.0, 4.0]
    clock.t += 4.0
    assert b.allow()
    b.success()
    for _ in range(3):
        b.allow()
        b.failure(TimeoutError("slow"))
    start = clock.t
    while not b.allow():
        clock.t += 0.25
    assert clock.t - start == 1.0  # success reset the backoff


def test_success_resets_the_failure_count() -> None:
    b = make(Clock())
    for _ in range(5):
        b.allow()
        b.failure(OSError("x"))
        b.allow()
        b.failure(OSError("x"))
        b.allow()
        b.success()
    assert b.state is BreakerState.CLOSED and b.transitions == []


def test_a_lost_probe_does_not_wedge_the_breaker() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(3):
        b.allow()
        b.failure(OSError("x"))
    clock.t += 1.0
    assert b.allow()  # probe taken, never reported
    clock.t += 3.9
    assert not b.allow()
    clock.t += 0.2  # backoff_max_s after the lost probe
    assert b.allow()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError, match="backoff"):
        CircuitBreaker("x", backoff_initial_s=5, backoff_max_s=1)


def test_one_slow_failure_opens_at_once() -> None:
    """Issue 22.7: a call that ran into its timeout must not be repeated failure_threshold times."""
    clock = Clock()
    b = make(clock)
    assert b.allow()
    b.failure(TimeoutError("no answer"), slow=True)
    assert b.state is BreakerState.OPEN and not b.allow()


def test_background_probe_closes_without_any_caller_probing() -> None:
    import threading
    import time

    answers = [ConnectionError("still down"), None]
    probed = threading.Event()

    def probe() -> None:
        a = answers.pop(0)
        if a is not None:
            raise a
        probed.set()

    b = CircuitBreaker(
        "bg", failure_threshold=1, backoff_initial_s=0.01, backoff_max_s=0.02, jitter=0.0, probe=probe
    )
    b.failure(ConnectionError("refused"))
    assert b.state is BreakerState.OPEN
    deadline = time.monotonic() + 10
    while b.state is not BreakerState.CLOSED and time.monotonic() < deadline:
        assert not b.allow() or b.state is BreakerState.CLOSED  # callers never become the probe
        time.sleep(0.005)
    assert probed.is_set() and b.state is BreakerState.CLOSED and b.allow()
    assert answers == [] and b.failures == 2  # the failed probe was counted, then it recovered
    b.close()
