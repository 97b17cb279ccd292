"""Pacing the calls to edrone: a per-app rate limit and a breaker that pauses while edrone fails."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

# How late a sleeper may wake and still have its slot's own time logged (see acquire).
_OVERSHOOT_S = 0.005


class RateLimiter:
    """At most ``rate_per_s`` call starts in any window of one second (plus ``margin_s``).

    A sliding log, not a token bucket: a bucket lets a full burst follow a full second, which
    puts twice the limit into one window; edrone's limit is per window. Waiters go in order.

    A start is logged when the slot is taken, but edrone counts a request when it arrives, and
    the delay between the two varies; ``margin_s`` is the variation allowed for. At 20 ms the
    benchmark's fake-edrone, on a busy machine, saw up to 118 requests in one second (arrivals
    up to 42 ms closer than their starts); 40 ms still keeps the rate above 95/s."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        margin_s: float = 0.04,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self._calls = max(1, math.floor(rate_per_s))
        # A rate below one per second becomes one call per 1/rate seconds.
        self._window_s = self._calls / rate_per_s + margin_s
        self._starts: deque[float] = deque()
        self._lock = asyncio.Lock()
        self._clock = clock

    async def acquire(self) -> float:
        """Wait for a slot; return how long that took, in seconds: exactly 0.0 when a slot
        was free at once (callers count the calls that had to wait)."""
        started = self._clock()
        # Queued behind a caller that sleeps for a slot is waiting too.
        waited = self._lock.locked()
        async with self._lock:
            slot = 0.0
            while True:
                now = self._clock()
                while self._starts and now - self._starts[0] >= self._window_s:
                    self._starts.popleft()
                if len(self._starts) < self._calls:
                    # Logged at the slot's own time, not at the (later) wake-up: otherwise each
                    # sleep's overshoot adds up, window after window, and the rate sags. A wake-up
                    # later than _OVERSHOOT_S is logged as it happened, so the margin covers it.
                    self._starts.append(max(slot, now - _OVERSHOOT_S) if slot else now)
                    return now - started if waited else 0.0
                waited = True
                slot = self._starts[0] + self._window_s
                await asyncio.sleep(slot - now)


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
