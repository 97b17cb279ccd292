"""The rate limit shared through PostgreSQL: limiters on pools of their own stand for forwarder
processes (replicas, the background lane's own process) sharing one app's limit; real clock,
real database."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from bridge.db import create_pool
from consumers.rate_budget import SharedRateLimiter

APP = "app-1"
LATENCY_S = 0.02  # each call's answer


def max_in_window(starts: list[float], window_s: float) -> int:
    starts = sorted(starts)
    most, first = 0, 0
    for last, at in enumerate(starts):
        while at - starts[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


MakeLimiter = Callable[..., Awaitable[SharedRateLimiter]]


@pytest.fixture
async def make_limiter(db: asyncpg.Connection, settings: Any) -> AsyncIterator[MakeLimiter]:
    """A limiter of APP on a pool of its own, as each process has (the schema is migrated)."""
    pools: list[asyncpg.Pool] = []
    limiters: list[SharedRateLimiter] = []

    async def make(rate_per_s: float, **options: Any) -> SharedRateLimiter:
        pool = await create_pool(settings, command_timeout_s=10.0, max_size=2)
        pools.append(pool)
        options = {"hold_s": 5.0, "db_timeout_s": 10.0} | options
        limiters.append(SharedRateLimiter(pool, APP, rate_per_s, **options))
        return limiters[-1]

    yield make
    for limiter in limiters:
        await limiter.close()
    for pool in pools:
        await asyncio.wait_for(pool.close(), 10)


class Calls:
    """Every call's (start, background, waited), each holding its slot for LATENCY_S."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool, float]] = []

    async def call(self, limiter: SharedRateLimiter, background: bool = False) -> None:
        async with limiter.slot(background=background) as waited:
            self.calls.append((time.monotonic(), background, waited))
            await asyncio.sleep(LATENCY_S)

    async def live(self, limiter: SharedRateLimiter, rate_per_s: float, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        calls = []
        for _ in range(round(rate_per_s * seconds)):
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += 1 / rate_per_s
            calls.append(asyncio.create_task(self.call(limiter)))
        await asyncio.gather(*calls)

    async def background(self, limiter: SharedRateLimiter, workers: int, until: float) -> None:
        async def worker() -> None:
            while time.monotonic() < until:
                await self.call(limiter, background=True)

        await asyncio.gather(*(worker() for _ in range(workers)))

    def starts(self, background: bool | None = None, since: float = 0.0) -> list[float]:
        return [at for at, bg, _ in self.calls if background in (None, bg) and at >= since]

    def live_waits(self) -> list[float]:
        return [waited for _, bg, waited in self.calls if not bg]


async def test_processes_together_never_exceed_the_rate(make_limiter: MakeLimiter):
    """Three processes, 150 callers at once at 50/s: no one-second window sees more than 50
    starts over all of them, and they do not dawdle (the run takes about 2 s)."""
    limiters = [await make_limiter(50) for _ in range(3)]
    calls = Calls()
    began = time.monotonic()
    await asyncio.gather(*(calls.call(limiters[i % 3]) for i in range(150)))
    elapsed = time.monotonic() - began
    assert max_in_window(calls.starts(), 1.0) == 50
    assert 2.0 <= elapsed < 3.5


async def test_a_full_window_waits_for_its_oldest_call(make_limiter: MakeLimiter):
    """At 5/s five calls of one process go at once; the sixth, from another process, waits
    until the first leaves the window; waits are exactly 0.0 when nothing held them up."""
    first, second = await make_limiter(5), await make_limiter(5)
    waits = []
    for _ in range(5):
        async with first.slot() as waited:
            waits.append(waited)
    async with second.slot() as waited:
        waits.append(waited)
    assert waits[:5] == [0.0] * 5
    assert waits[5] == pytest.approx(1.0, abs=0.1)


async def test_a_slow_answer_holds_its_slot(make_limiter: MakeLimiter):
    """A request counts until its answer and a window after, in every process."""
    first, second = await make_limiter(1), await make_limiter(1)
    async with first.slot():
        await asyncio.sleep(0.3)  # edrone is slow to answer
    began = time.monotonic()
    async with second.slot() as waited:
        assert waited > 0
    assert time.monotonic() - began == pytest.approx(1.0, abs=0.1)


async def test_a_background_process_leaves_live_its_share(make_limiter: MakeLimiter):
    """100/s: live at 30/s for 8 s in one process; from the second second on, a background
    process with 20 callers always asking. No live call waits; the background takes at least
    60 % of the 70/s left; no window of both holds more than 100."""
    live, background = await make_limiter(100), await make_limiter(100)
    calls = Calls()
    began = time.monotonic()

    async def later() -> None:
        await asyncio.sleep(1.0)
        await calls.background(background, 20, until=began + 8.0)

    await asyncio.gather(calls.live(live, 30, 8.0), later())

    assert calls.live_waits() == [0.0] * 240
    steady = calls.starts(True, since=began + 3.0)
    assert len([at for at in steady if at < began + 8.0]) >= 0.6 * 70 * 5
    assert max_in_window(calls.starts(), 1.0) <= 100


async def test_idle_live_leaves_the_background_all_but_the_floor(make_limiter: MakeLimiter):
    """With no live traffic the background uses 90 of every 100 calls; the floor of 10 %
    stays free for a burst out of silence in another process, which goes at once."""
    live, background = await make_limiter(100), await make_limiter(100)
    calls = Calls()
    until = time.monotonic() + 3.0

    async def burst() -> None:
        await asyncio.sleep(2.0)
        await asyncio.gather(*(calls.call(live) for _ in range(10)))

    await asyncio.gather(calls.background(background, 30, until), burst())

    assert max_in_window(calls.starts(True), 1.0) == 90
    assert calls.live_waits() == [0.0] * 10


async def test_a_background_caller_gives_up_after_its_timeout(make_limiter: MakeLimiter):
    """A background caller that finds no room within its timeout gets TimeoutError and
    leaves nothing behind: no waiter, no slot taken."""
    live, background = await make_limiter(5), await make_limiter(5)
    held = [await live.acquire() for _ in range(5)]
    with pytest.raises(TimeoutError):
        await background.acquire(background=True, timeout_s=0.05)
    assert background.waiting == 0
    for slot_id, _ in held:
        live.release(slot_id)
    async with live.slot() as waited:  # the window still counts the five, not a sixth
        assert waited == pytest.approx(1.0, abs=0.1)


async def test_a_killed_process_frees_its_slots_after_their_hold(make_limiter: MakeLimiter):
    """A process killed mid-call never releases: its slots count for the longest a call may
    take and a window, then another process goes."""
    doomed, survivor = await make_limiter(2, hold_s=0.5), await make_limiter(2, hold_s=0.5)
    await doomed.acquire()
    await doomed.acquire()  # never released: the process is gone
    began = time.monotonic()
    async with survivor.slot() as waited:
        assert waited > 0
    # window (1 s) + hold (0.5 s) after the take
    assert time.monotonic() - began == pytest.approx(1.5, abs=0.15)


async def test_a_take_that_fails_fails_its_callers(settings: Any, db: asyncpg.Connection):
    """PostgreSQL unreachable: the callers get the error at once (their batch is retried like
    any other that could not reach the database), nothing waits forever."""
    pool = await create_pool(settings, command_timeout_s=10.0, max_size=1)
    limiter = SharedRateLimiter(pool, APP, 10, hold_s=5.0, db_timeout_s=2.0)
    await pool.close()
    results = await asyncio.wait_for(
        asyncio.gather(*(limiter.acquire() for _ in range(3)), return_exceptions=True), 5
    )
    assert all(isinstance(result, asyncpg.InterfaceError) for result in results), results
    assert limiter.waiting == 0
    await limiter.close()


async def test_live_callers_of_a_process_go_before_its_background(make_limiter: MakeLimiter):
    """One slot a window: a background caller waiting first and a live one after it; when the
    slot frees, live takes it."""
    limiter = await make_limiter(1)
    slot_id, _ = await limiter.acquire()
    order: list[str] = []

    async def take(background: bool) -> None:
        got, _ = await limiter.acquire(background=background)
        order.append("background" if background else "live")
        limiter.release(got)

    waiting = asyncio.create_task(take(True))
    await asyncio.sleep(0.05)
    live = asyncio.create_task(take(False))
    await asyncio.sleep(0.05)
    limiter.release(slot_id)
    await asyncio.wait_for(live, 5)
    assert order == ["live"]
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


@pytest.mark.parametrize(
    "options",
    [
        {"reserve_fraction": 1.0},
        {"reserve_fraction": -0.1},
        {"headroom": 0.5},
        {"memory_windows": 0},
    ],
)
def test_settings_out_of_range_are_refused(options: dict[str, float]):
    """A reserve of the whole limit would starve the background forever; a headroom below 1 or
    no memory would let the background into live's recent demand; a rate of 0 is no limit."""
    with pytest.raises(ValueError):
        SharedRateLimiter(None, APP, 100, hold_s=1.0, db_timeout_s=1.0, **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SharedRateLimiter(None, APP, 0, hold_s=1.0, db_timeout_s=1.0)  # type: ignore[arg-type]
