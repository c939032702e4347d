"""The sliding-log limiter's arithmetic, with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from relay.ratelimit import SlidingWindowLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def send(limiter: SlidingWindowLimiter) -> None:
    assert limiter.try_acquire()
    limiter.release()


def test_allows_exactly_the_limit_in_a_window() -> None:
    clock = Clock()
    limiter = SlidingWindowLimiter(60, clock=clock, margin=0.05)
    for _ in range(60):
        send(limiter)
        clock.now += 0.1
    assert not limiter.try_acquire()
    # The first request was logged at 1000.0: the 61st may go at 1060.05, not before.
    assert limiter.delay() == pytest.approx(1060.05 - clock.now)
    clock.now = 1060.04
    assert not limiter.try_acquire()
    clock.now = 1060.05
    assert limiter.try_acquire()


def test_window_slides_one_request_at_a_time() -> None:
    clock = Clock()
    limiter = SlidingWindowLimiter(3, window=10, margin=0, clock=clock)
    for t in (0, 2, 4):
        clock.now = 1000 + t
        send(limiter)
    clock.now = 1005
    assert limiter.delay() == pytest.approx(5)  # the request of t=0 leaves at t=10
    clock.now = 1010
    send(limiter)
    assert limiter.delay() == pytest.approx(2)  # next: the one of t=2 leaves at t=12


def test_no_burst_after_a_quiet_minute_beyond_the_limit() -> None:
    """A token bucket would allow limit + refill; a log never allows more than limit a window."""
    clock = Clock()
    limiter = SlidingWindowLimiter(10, window=60, margin=0, clock=clock)
    sent: list[float] = []
    while clock.now < 1000 + 300:
        if limiter.try_acquire():
            limiter.release()
            sent.append(clock.now)
        clock.now += 0.5
    for i, t in enumerate(sent):
        in_window = [s for s in sent[i:] if s < t + 60]
        assert len(in_window) <= 10


def test_pending_requests_hold_their_slots() -> None:
    clock = Clock()
    limiter = SlidingWindowLimiter(2, clock=clock)
    assert limiter.try_acquire()
    assert limiter.try_acquire()
    assert limiter.delay() == float("inf")  # both slots pending: wait for an answer
    limiter.release()
    assert limiter.delay() == pytest.approx(60.05)


def test_a_request_that_never_left_frees_its_slot() -> None:
    clock = Clock()
    limiter = SlidingWindowLimiter(1, clock=clock)
    assert limiter.try_acquire()
    limiter.release(sent=False)
    assert limiter.try_acquire()


def test_requests_are_logged_when_answered_not_when_sent() -> None:
    clock = Clock()
    limiter = SlidingWindowLimiter(1, window=60, margin=0, clock=clock)
    assert limiter.try_acquire()
    clock.now += 3  # a slow answer
    limiter.release()
    clock.now += 58
    assert limiter.delay() == pytest.approx(2)


def test_retry_after_is_a_floor() -> None:
    clock = Clock()
    limiter = SlidingWindowLimiter(60, clock=clock)
    limiter.block(30)
    assert limiter.delay() == pytest.approx(30)
    limiter.block(5)  # a shorter answer later never shortens the wait
    assert limiter.delay() == pytest.approx(30)


def test_acquire_waits_for_the_window() -> None:
    async def scenario() -> float:
        limiter = SlidingWindowLimiter(2, window=0.3, margin=0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(3):
            await limiter.acquire()
            limiter.release()
        return loop.time() - start

    assert asyncio.run(scenario()) >= 0.29
