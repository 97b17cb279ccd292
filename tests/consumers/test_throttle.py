"""Pacing: the per-app rate limit and the breaker, on the real clock or a stepped one."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumers.throttle import Breaker, RateLimiter


def max_in_window(starts: list[float], window_s: float) -> int:
    starts = sorted(starts)
    most, first = 0, 0
    for last, at in enumerate(starts):
        while at - starts[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


class TestRateLimiter:
    async def test_no_window_holds_more_than_the_rate(self):
        """120 concurrent callers at 50/s: no one-second window sees more than 50 starts,
        and the limiter does not dawdle either (the whole run takes about 2 s)."""
        limiter = RateLimiter(50)
        starts: list[float] = []

        async def call() -> None:
            async with limiter.slot():
                starts.append(time.monotonic())

        began = time.monotonic()
        await asyncio.gather(*(call() for _ in range(120)))
        elapsed = time.monotonic() - began
        assert max_in_window(starts, 1.0) == 50
        assert 2.0 <= elapsed < 3.0

    async def test_a_full_window_waits_for_its_oldest_call(self):
        """At 5/s five calls go at once; the sixth waits until the first leaves the window."""
        limiter = RateLimiter(5)
        waits = []
        for _ in range(6):
            async with limiter.slot() as waited:
                waits.append(waited)
        assert waits[:5] == pytest.approx([0.0] * 5, abs=0.01)
        assert waits[5] == pytest.approx(1.0, abs=0.05)

    async def test_a_slow_answer_holds_its_slot(self):
        """A request counts until its answer and a window after: one that edrone receives
        late can never land less than a second before the next one."""
        limiter = RateLimiter(1)
        async with limiter.slot():
            await asyncio.sleep(0.3)  # edrone is slow to answer
        began = time.monotonic()
        async with limiter.slot() as waited:
            assert waited > 0
        assert time.monotonic() - began == pytest.approx(1.0, abs=0.05)

    def test_rate_must_be_positive(self):
        """A zero or negative rate is a configuration error, not an endless wait."""
        with pytest.raises(ValueError):
            RateLimiter(0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestBreaker:
    def test_pauses_after_the_threshold_and_probes_after_the_pause(self):
        """Three failures in a row pause calls for the initial pause; then one probe may go."""
        clock = Clock()
        breaker = Breaker(failures=3, initial_pause_s=1.0, max_pause_s=8.0, clock=clock)
        breaker.failed()
        breaker.failed()
        assert breaker.paused_for_s == 0
        breaker.failed()
        assert breaker.paused_for_s == pytest.approx(1.0)
        clock.now += 1.0
        assert breaker.paused_for_s == 0 and breaker.probing

    def test_failed_probes_double_the_pause_up_to_the_cap(self):
        """Each failed probe doubles the pause, never past max_pause_s."""
        clock = Clock()
        breaker = Breaker(failures=1, initial_pause_s=1.0, max_pause_s=4.0, clock=clock)
        breaker.failed()
        pauses = []
        for _ in range(4):
            clock.now += breaker.paused_for_s
            breaker.failed()  # the probe fails
            pauses.append(breaker.paused_for_s)
        assert pauses == pytest.approx([2.0, 4.0, 4.0, 4.0])

    def test_success_closes_it(self):
        """A success ends the pause cycle and resets the count of failures."""
        clock = Clock()
        breaker = Breaker(failures=2, initial_pause_s=1.0, max_pause_s=4.0, clock=clock)
        breaker.failed()
        breaker.failed()
        clock.now += 1.0
        breaker.succeeded()
        assert not breaker.probing
        breaker.failed()
        assert breaker.paused_for_s == 0
