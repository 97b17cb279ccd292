"""Pacing the calls to edrone: a per-app rate limit and a breaker that pauses while edrone fails."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class RateLimiter:
    """At most ``rate_per_s`` requests reach edrone in any one-second window.

    edrone counts a request when it arrives, some time between our start and its answer. So a
    slot is held from the start until the answer, and for a window after it: then, whatever the
    delays, no window of arrivals can hold more than the limit. (Counting starts alone lets a
    delayed request land less than a second before a prompt one: on a busy machine the
    benchmark's fake-edrone saw 118 in one second.) A sliding log, not a token bucket, which
    would let a full burst follow a full second. Waiters go in order.

    With answers taking L seconds a slot turns over every 1 + L seconds: 98/s at 20 ms."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        margin_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self._calls = max(1, math.floor(rate_per_s))
        # A rate below one per second becomes one call per 1/rate seconds.
        self._window_s = self._calls / rate_per_s + margin_s
        self._in_flight = 0
        self._ends: deque[float] = deque()
        self._ended = asyncio.Event()
        self._lock = asyncio.Lock()
        self._clock = clock

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a slot for one request; yields how long it waited (exactly 0.0 when a slot
        was free at once: callers count the calls that had to wait)."""
        waited = await self.acquire()
        try:
            yield waited
        finally:
            self.release()

    async def acquire(self) -> float:
        """Take a slot (give it back with :meth:`release` once the answer came)."""
        started = self._clock()
        # Queued behind a caller that sleeps for a slot is waiting too.
        waited = self._lock.locked()
        async with self._lock:
            while True:
                now = self._clock()
                while self._ends and now - self._ends[0] >= self._window_s:
                    self._ends.popleft()
                if self._in_flight + len(self._ends) < self._calls:
                    self._in_flight += 1
                    return now - started if waited else 0.0
                waited = True
                if self._ends:
                    await asyncio.sleep(self._ends[0] + self._window_s - now)
                else:  # every slot is in flight: the next answer starts the clock
                    self._ended.clear()
                    await self._ended.wait()

    def release(self) -> None:
        self._in_flight -= 1
        self._ends.append(self._clock())
        self._ended.set()


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
