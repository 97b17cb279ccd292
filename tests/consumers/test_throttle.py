"""The breaker, on a stepped clock (the rate limit: test_rate_budget.py)."""

from __future__ import annotations

import pytest

from consumers.throttle import Breaker


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
