"""Pacing the calls to edrone: a per-app rate limit and a breaker that pauses while edrone fails."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager


class RateLimiter:
    """At most ``rate_per_s`` requests reach edrone in any one-second window, live ones first.

    edrone counts a request when it arrives, some time between our start and its answer. So a
    slot is held from the start until the answer, and for a window after it: then, whatever the
    delays, no window of arrivals can hold more than the limit. (Counting starts alone lets a
    delayed request land less than a second before a prompt one: on a busy machine the
    benchmark's fake-edrone saw 118 in one second.) A sliding log, not a token bucket, which
    would let a full burst follow a full second. Waiters of a lane go in order.

    With answers taking L seconds a slot turns over every 1 + L seconds: 98/s at 20 ms.

    Two lanes share the limit. A live caller (the shop's changes) takes any free slot; a
    ``background`` caller (backfill, reconcile) only when no live caller waits, and only while
    the background holds fewer than ``calls - reserve`` slots: the reserve is kept for live
    traffic, so live never waits behind background calls while its demand stays within it.
    The reserve follows live demand: the most slots live held at once in any of the last
    ``memory_windows`` windows (30 s at 100/s: a shop's bursts recur within minutes, and a
    background that yields a little too long costs only throughput), times ``headroom`` (1.5:
    steady live traffic wanders well within half again its peak), and never below
    ``reserve_fraction`` of the limit (10 %: a burst out of silence, ten calls at 100/s, goes
    at once). A reserve of the whole limit stops the background while live fills the limit;
    once live is idle the reserve falls back to the floor within ``memory_windows``, so the
    background never starves for longer than that. Waiters are woken by the event that makes
    room (a slot leaving the window, live demand fading, a live waiter served or gone), from
    one timer task per limiter that sleeps until the next such moment."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        margin_s: float = 0.0,
        reserve_fraction: float = 0.1,
        headroom: float = 1.5,
        memory_windows: int = 30,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if not 0 <= reserve_fraction < 1:
            raise ValueError("reserve_fraction must be at least 0 and below 1")
        if headroom < 1:
            raise ValueError("headroom must be at least 1")
        if memory_windows < 1:
            raise ValueError("memory_windows must be at least 1")
        self._calls = max(1, math.floor(rate_per_s))
        # A rate below one per second becomes one call per 1/rate seconds.
        self._window_s = self._calls / rate_per_s + margin_s
        # Below the limit, so that an idle live lane always leaves the background a slot.
        self._floor = min(self._calls - 1, max(1, math.ceil(self._calls * reserve_fraction)))
        self._headroom = headroom
        self._memory = memory_windows
        self._clock = clock
        self._sleep = sleep
        # Per lane (False: live, True: background): slots in flight, ends still in the window
        # (in order), and the callers waiting (in order).
        self._in_flight = {False: 0, True: 0}
        self._ends: dict[bool, deque[float]] = {False: deque(), True: deque()}
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {False: deque(), True: deque()}
        # (window number, most slots live held at once in it), oldest first.
        self._peaks: deque[tuple[int, int]] = deque()
        self._timer: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot, of both lanes."""
        return len(self._waiting[False]) + len(self._waiting[True])

    @property
    def reserve(self) -> int:
        """Slots the background leaves to live traffic now."""
        return self._reserve(self._clock())

    def _reserve(self, now: float) -> int:
        window = self._window_number(now)
        peak = max((held for at, held in self._peaks if at > window - self._memory), default=0)
        return min(self._calls, max(self._floor, math.ceil(peak * self._headroom)))

    @asynccontextmanager
    async def slot(
        self, *, background: bool = False, timeout_s: float | None = None
    ) -> AsyncIterator[float]:
        """Hold a slot for one request; yields how long it waited (exactly 0.0 when a slot
        was free at once: callers count the calls that had to wait)."""
        waited = await self.acquire(background=background, timeout_s=timeout_s)
        try:
            yield waited
        finally:
            self.release(background=background)

    async def acquire(self, *, background: bool = False, timeout_s: float | None = None) -> float:
        """Take a slot (give it back with :meth:`release` once the answer came); TimeoutError
        after ``timeout_s`` without one, leaving nothing held."""
        started = self._clock()
        self._prune(started)
        queued = self._waiting[background] or (background and self._waiting[False])
        if not queued and self._has_room(background, started):
            self._take(background, started)
            return 0.0
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[background].append(granted)
        self._arm()
        try:
            async with asyncio.timeout(timeout_s):
                await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(background=background)  # granted as it gave up
            else:
                granted.cancel()
                self._waiting[background].remove(granted)
                self._grant()  # a live waiter gone may let the background go
                if not self.waiting and self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            raise
        return self._clock() - started

    def release(self, *, background: bool = False) -> None:
        self._in_flight[background] -= 1
        self._ends[background].append(self._clock())
        self._arm()

    def _window_number(self, now: float) -> int:
        return math.floor(now / self._window_s)

    def _prune(self, now: float) -> None:
        for ends in self._ends.values():
            while ends and now - ends[0] >= self._window_s:
                ends.popleft()

    def _held(self, background: bool) -> int:
        return self._in_flight[background] + len(self._ends[background])

    def _has_room(self, background: bool, now: float) -> bool:
        if self._held(False) + self._held(True) >= self._calls:
            return False
        return not background or self._held(True) < self._calls - self._reserve(now)

    def _take(self, background: bool, now: float) -> None:
        self._in_flight[background] += 1
        if background:
            return
        window, held = self._window_number(now), self._held(False)
        if self._peaks and self._peaks[-1][0] == window:
            held = max(held, self._peaks[-1][1])
            self._peaks.pop()
        self._peaks.append((window, held))
        while self._peaks[0][0] <= window - self._memory:
            self._peaks.popleft()

    def _grant(self) -> None:
        """Serve the waiters there is room for: live ones first, the background only when no
        live caller waits."""
        now = self._clock()
        self._prune(now)
        for background in (False, True):
            waiting = self._waiting[background]
            while waiting and self._has_room(background, now):
                granted = waiting.popleft()
                self._take(background, now)
                granted.set_result(None)
            if waiting:
                return

    def _next_change_s(self, now: float) -> float | None:
        """How long until room may appear without a call ending: the oldest end leaving the
        window, or, for a waiting background, the live demand of a window being forgotten."""
        moments = [ends[0] + self._window_s for ends in self._ends.values() if ends]
        if self._waiting[True] and self._peaks:
            moments.append((self._window_number(now) + 1) * self._window_s)
        if not moments:
            return None  # every slot is in flight: the next release arms the timer again
        # At least a millisecond: a moment computed in floats may fall a hair short.
        return max(min(moments) - now, 0.001)

    def _arm(self) -> None:
        if self.waiting and (self._timer is None or self._timer.done()):
            self._timer = asyncio.get_running_loop().create_task(self._wake_waiters())

    async def _wake_waiters(self) -> None:
        while True:
            self._grant()
            delay_s = self._next_change_s(self._clock()) if self.waiting else None
            if delay_s is None:
                return
            await self._sleep(delay_s)


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
