"""Pacing: the per-app rate limit and the breaker, on the real clock or a stepped one."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Coroutine
from typing import Any

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


class VirtualTime:
    """A clock and a sleep for the limiter and its callers that run simulated seconds at once:
    the tasks run until every one waits, then the clock jumps to the next timer."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + delay_s, next(self._order), timer))
        await timer

    async def run(self, *work: Coroutine[Any, Any, object]) -> None:
        tasks = [asyncio.create_task(w) for w in work]
        while True:
            for _ in range(30):  # let every task run until it waits
                await asyncio.sleep(0)
            if all(task.done() for task in tasks):
                break
            while self._timers and self._timers[0][2].done():
                heapq.heappop(self._timers)
            assert self._timers, "every task waits and no timer is set: a lost wake-up"
            at, _, timer = heapq.heappop(self._timers)
            self.now = max(self.now, at)
            timer.set_result(None)
        for task in tasks:
            task.result()


# (start, background, waited) of every call.
Calls = list[tuple[float, bool, float]]


class Traffic:
    """Callers of one limiter on virtual time, each holding its slot for ``latency_s``."""

    def __init__(self, limiter: RateLimiter, clock: VirtualTime, latency_s: float = 0.02):
        self.limiter, self.clock, self.latency_s = limiter, clock, latency_s
        self.calls: Calls = []

    async def call(self, background: bool) -> None:
        async with self.limiter.slot(background=background) as waited:
            self.calls.append((self.clock.now, background, waited))
            await self.clock.sleep(self.latency_s)

    async def live(self, rate_per_s: float, seconds: float, *, after_s: float = 0.0) -> None:
        """Live calls at a steady rate, one every 1/rate seconds."""
        await self.clock.sleep(after_s)
        calls = []
        for _ in range(round(rate_per_s * seconds)):
            calls.append(asyncio.create_task(self.call(False)))
            await self.clock.sleep(1 / rate_per_s)
        await asyncio.gather(*calls)

    async def burst(self, count: int, *, after_s: float) -> None:
        await self.clock.sleep(after_s)
        await asyncio.gather(*(self.call(False) for _ in range(count)))

    async def background(self, workers: int, until_s: float, *, after_s: float = 0.0) -> None:
        """``workers`` background callers, each calling again as soon as its call ends."""
        end = self.clock.now + until_s
        await self.clock.sleep(after_s)

        async def worker() -> None:
            while self.clock.now < end:
                await self.call(True)

        await asyncio.gather(*(worker() for _ in range(workers)))

    def starts(self, background: bool, since: float = 0.0, until: float = 1e12) -> list[float]:
        return [at for at, bg, _ in self.calls if bg == background and since <= at < until]

    def live_waits(self) -> list[float]:
        return [waited for _, bg, waited in self.calls if not bg]


def virtual_limiter(rate_per_s: float, **options: Any) -> tuple[RateLimiter, VirtualTime]:
    clock = VirtualTime()
    return RateLimiter(rate_per_s, clock=clock, sleep=clock.sleep, **options), clock


class TestBackgroundLane:
    async def test_live_never_waits_and_the_background_fills_the_rest(self):
        """100/s, live calls at 30/s for 20 s and, from the second second on, 20 background
        callers always asking: no live call waits, as none does alone; the background takes
        most of the other 70/s (at least 60 %), and no window holds more than 100 calls."""
        limiter, clock = virtual_limiter(100)
        alone = Traffic(*virtual_limiter(100))
        await alone.clock.run(alone.live(30, 20))
        traffic = Traffic(limiter, clock)
        began = clock.now

        await clock.run(traffic.live(30, 20), traffic.background(20, 18, after_s=2.0))

        assert alone.live_waits() == [0.0] * 600
        assert traffic.live_waits() == [0.0] * 600
        steady = traffic.starts(True, since=began + 5, until=began + 20)
        assert len(steady) >= 0.6 * (100 - 30) * 15
        assert max_in_window([at for at, _, _ in traffic.calls], 1.0) <= 100

    async def test_a_burst_as_large_as_a_recent_one_finds_room(self):
        """Live sent 60 at once two seconds ago; the background filled what was left since:
        another burst of 60 goes at once, none waiting behind a background call."""
        limiter, clock = virtual_limiter(100)
        traffic = Traffic(limiter, clock)

        await clock.run(
            traffic.burst(60, after_s=0.0),
            traffic.burst(60, after_s=3.0),
            traffic.background(20, 5),
        )

        assert traffic.live_waits() == [0.0] * 120
        assert traffic.starts(True, since=clock.now - 4, until=clock.now - 2)  # it did fill
        assert max_in_window([at for at, _, _ in traffic.calls], 1.0) <= 100

    async def test_idle_live_leaves_the_background_all_but_the_floor(self):
        """With no live traffic the background uses 90 of every 100 calls: the floor of 10 %
        stays free for a burst out of silence, which then goes at once."""
        limiter, clock = virtual_limiter(100)
        traffic = Traffic(limiter, clock)

        await clock.run(traffic.background(30, 10), traffic.burst(10, after_s=5.0))

        assert max_in_window(traffic.starts(True), 1.0) == 90
        assert len(traffic.starts(True)) >= 8 * 90
        assert traffic.live_waits() == [0.0] * 10

    async def test_live_waiting_holds_the_background_back_until_its_demand_fades(self):
        """150 live calls at once fill the limit and wait for the rest: the background goes
        only after the last live call, and once live demand is forgotten (30 windows) it
        gets its share again: it never starves while live is idle."""
        limiter, clock = virtual_limiter(100)
        traffic = Traffic(limiter, clock)
        began = clock.now

        await clock.run(traffic.burst(150, after_s=0.0), traffic.background(5, 40, after_s=0.01))

        last_live = max(traffic.starts(False))
        first_background = min(traffic.starts(True))
        assert first_background > last_live
        assert first_background <= began + 33
        assert len(traffic.starts(True, since=began + 33)) >= 5 * 90

    async def test_a_limit_of_one_call_still_serves_the_background(self):
        """At 1/s there is no room for a reserve: an idle live lane leaves the background its
        one call per window."""
        limiter, clock = virtual_limiter(1)
        traffic = Traffic(limiter, clock)

        await clock.run(traffic.background(2, 5))

        starts = traffic.starts(True)
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        # Each call holds the one slot for its answer (20 ms) and a window after it.
        assert len(starts) >= 5 and gaps == pytest.approx([1.02] * len(gaps))

    async def test_a_background_caller_gives_up_after_its_timeout(self):
        """A background caller that finds no room within its timeout gets TimeoutError and
        leaves nothing behind: no waiter, no slot."""
        limiter = RateLimiter(5)
        for _ in range(5):
            await limiter.acquire()
        with pytest.raises(TimeoutError):
            await limiter.acquire(background=True, timeout_s=0.05)
        assert limiter.waiting == 0
        for _ in range(5):
            limiter.release()
        async with limiter.slot() as waited:  # the window still counts the five, not a sixth
            assert waited == pytest.approx(1.0, abs=0.05)

    @pytest.mark.parametrize(
        "options",
        [
            {"reserve_fraction": 1.0},
            {"reserve_fraction": -0.1},
            {"headroom": 0.5},
            {"memory_windows": 0},
        ],
    )
    def test_settings_out_of_range_are_refused(self, options: dict[str, float]):
        """A reserve of the whole limit would starve the background forever; a headroom
        below 1 or no memory would let the background into live's recent demand."""
        with pytest.raises(ValueError):
            RateLimiter(100, **options)


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
