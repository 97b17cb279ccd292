"""Pacing the calls to edrone: a breaker that pauses them while edrone fails (the rate limit,
shared by every process, is consumers/rate_budget.py)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    """Stops the calls after ``failures`` failures in a row, for a pause that doubles (up to
    ``max_pause_s``) each time the first call after a pause, the probe, fails too."""

    def __init__(
        self,
        *,
        failures: int,
        initial_pause_s: float,
        max_pause_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._initial_pause_s = initial_pause_s
        self._max_pause_s = max_pause_s
        self._clock = clock
        self._failures = 0
        self._pause_s = 0.0
        self._paused_until = 0.0

    @property
    def paused_for_s(self) -> float:
        """How long calls must still wait; 0 while calls may go."""
        return max(0.0, self._paused_until - self._clock())

    @property
    def probing(self) -> bool:
        """A pause has ended and no call has succeeded since: let one call test the way."""
        return self._pause_s > 0 and self.paused_for_s == 0

    def succeeded(self) -> None:
        self._failures = 0
        self._pause_s = 0.0

    def failed(self) -> None:
        self._failures += 1
        if self.probing:
            self._pause(min(self._pause_s * 2, self._max_pause_s))
        elif self._failures >= self._threshold and self.paused_for_s == 0:
            self._pause(self._initial_pause_s)

    def _pause(self, pause_s: float) -> None:
        self._pause_s = pause_s
        self._paused_until = self._clock() + pause_s
