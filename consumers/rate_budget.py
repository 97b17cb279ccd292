"""Each app's rate limit at edrone, shared by every forwarder process of a schema through
PostgreSQL (schemas/migrations/0009_rate_slots.sql): replicas of ``consume traces`` and the
background lane's own process together never send edrone more than the limit in a window."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import structlog

log = structlog.get_logger(__name__)

_TAKE = "SELECT slot_ids, retry_after_s FROM take_rate_slots($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_RELEASE = """
UPDATE rate_slots
   SET counts_until = least(counts_until, clock_timestamp() + make_interval(secs => $3))
 WHERE app_id = $1 AND slot_id = ANY($2::bigint[])
"""


@dataclass(eq=False)
class _Waiter:
    granted: asyncio.Future[int]
    # A take ran while it waited and found no slot for it: it waited for the limit.
    held_up: bool = field(default=False)


class SharedRateLimiter:
    """At most ``rate_per_s`` requests of one app reach edrone in any one-second window, over
    every process that shares the database, live ones first.

    edrone counts a request when it arrives, some time between our start and its answer, so a
    slot is held from the start until the answer and for a window after it: whatever the
    delays, no window of arrivals holds more than the limit (a sliding log, not a token bucket,
    which would let a full burst follow a full second). With answers taking L seconds a slot
    turns over every 1 + L seconds: 98/s at 20 ms. A live caller takes any free slot; a
    ``background`` caller (backfill, reconcile) only while the background holds fewer than
    ``calls - reserve``. The reserve follows live demand: live's peak in the last
    ``memory_windows`` windows (30 s at 100/s: a shop's bursts recur within minutes) times
    ``headroom`` (steady traffic wanders well within half again its peak), never below
    ``reserve_fraction`` of the limit (a burst out of silence goes at once); once live is idle
    it falls back to that floor within ``memory_windows``, so the background never starves
    longer than that. Within a process live waiters go first, and each lane's
    in order. A process killed mid-call frees its slots after ``hold_s`` (the longest a call
    may take) and a window.

    Callers queue here, and one task per limiter takes slots for all of them at once, so a
    limiter costs one statement per round of callers and holds at most one connection of
    ``pool`` at a time; releases are written the same way, batched. Every statement is bounded
    by ``db_timeout_s``; a take that fails fails the callers waiting on it, so the batch is
    retried like any other that could not reach PostgreSQL. A release that fails only makes
    the slot count until its hold ends."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        app_id: str,
        rate_per_s: float,
        *,
        hold_s: float,
        db_timeout_s: float,
        margin_s: float = 0.0,
        reserve_fraction: float = 0.1,
        headroom: float = 1.5,
        memory_windows: int = 30,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if not 0 <= reserve_fraction < 1:
            raise ValueError("reserve_fraction must be at least 0 and below 1")
        if headroom < 1:
            raise ValueError("headroom must be at least 1")
        if memory_windows < 1:
            raise ValueError("memory_windows must be at least 1")
        self._pool = pool
        self._app_id = app_id
        self._calls = max(1, math.floor(rate_per_s))
        # A rate below one per second becomes one call per 1/rate seconds.
        self._window_s = self._calls / rate_per_s + margin_s
        # Below the limit, so that an idle live lane always leaves the background a slot.
        self._floor = min(self._calls - 1, max(1, math.ceil(self._calls * reserve_fraction)))
        self._hold_s = hold_s
        self._headroom = headroom
        self._memory = memory_windows
        self._db_timeout_s = db_timeout_s
        self._waiting: dict[bool, deque[_Waiter]] = {False: deque(), True: deque()}
        self._taker: asyncio.Task[None] | None = None
        # Set when a caller arrives: a live one may find room a waiting background could not.
        self._arrived = asyncio.Event()
        self._released: list[int] = []
        self._releaser: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot, of both lanes."""
        return len(self._waiting[False]) + len(self._waiting[True])

    @asynccontextmanager
    async def slot(
        self, *, background: bool = False, timeout_s: float | None = None
    ) -> AsyncIterator[float]:
        """Hold a slot for one request; yields how long it waited for the limit (exactly 0.0
        when the first take after it came found room). TimeoutError after ``timeout_s``
        without one, leaving nothing held."""
        slot_id, waited = await self.acquire(background=background, timeout_s=timeout_s)
        try:
            yield waited
        finally:
            self.release(slot_id)

    async def close(self) -> None:
        """Stop taking (callers still waiting get CancelledError) and write the releases."""
        if self._taker is not None:
            self._taker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._taker
        for waiting in self._waiting.values():
            for waiter in waiting:
                waiter.granted.cancel()
            waiting.clear()
        if self._releaser is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._releaser

    async def acquire(
        self, *, background: bool = False, timeout_s: float | None = None
    ) -> tuple[int, float]:
        """Take a slot (give it back with :meth:`release` once the answer came): its id and
        how long it waited for the limit; TimeoutError after ``timeout_s``, nothing held."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter = _Waiter(loop.create_future())
        self._waiting[background].append(waiter)
        self._arrived.set()
        if self._taker is None or self._taker.done():
            self._taker = loop.create_task(self._take_for_waiters(), name="rate slots")
        try:
            async with asyncio.timeout(timeout_s):
                slot_id = await waiter.granted
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                if waiter.granted.exception() is None:
                    self.release(waiter.granted.result())  # granted as it gave up
            else:
                waiter.granted.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting[background].remove(waiter)
            raise
        return slot_id, (loop.time() - started if waiter.held_up else 0.0)

    async def _take_for_waiters(self) -> None:
        """Take slots for the callers waiting, live first, until none waits; between rounds
        that left some waiting, sleep until room may appear or a caller arrives."""
        while self.waiting:
            self._arrived.clear()
            retry_after_s = [
                after_s
                for background in (False, True)
                if (after_s := await self._serve(background)) is not None
            ]
            if not self.waiting:
                return
            if not retry_after_s:
                continue  # live was served: the background's turn now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(retry_after_s)):
                    await self._arrived.wait()

    async def _serve(self, background: bool) -> float | None:
        """One take for a lane's waiters (the background's only while no live caller of this
        process waits); how long until room may appear, if some still wait."""
        waiting = self._waiting[background]
        if not waiting or (background and self._waiting[False]):
            return None
        asked = list(waiting)
        try:
            slot_ids, after_s = await self._take(background, len(asked))
        except Exception as exc:
            self._fail(waiting, exc)
            return None
        for slot_id in slot_ids:
            self._grant(waiting, slot_id)
        for waiter in asked:
            if not waiter.granted.done():
                waiter.held_up = True
        return after_s if waiting else None

    async def _take(self, background: bool, wanted: int) -> tuple[list[int], float | None]:
        async with asyncio.timeout(self._db_timeout_s):
            row = await self._pool.fetchrow(
                _TAKE,
                self._app_id,
                background,
                wanted,
                self._calls,
                self._window_s,
                self._hold_s,
                self._floor,
                self._headroom,
                self._memory,
            )
        assert row is not None
        return list(row["slot_ids"]), row["retry_after_s"]

    def _grant(self, waiting: deque[_Waiter], slot_id: int) -> None:
        while waiting:
            waiter = waiting.popleft()
            if not waiter.granted.done():
                waiter.granted.set_result(slot_id)
                return
        self.release(slot_id)  # its caller gave up meanwhile

    def _fail(self, waiting: deque[_Waiter], exc: Exception) -> None:
        log.warning("rate_slots_not_taken", app_id=self._app_id, error=repr(exc))
        while waiting:
            waiter = waiting.popleft()
            if not waiter.granted.done():
                waiter.granted.set_exception(exc)

    def release(self, slot_id: int) -> None:
        """The slot's call was answered: from now on it counts for a window more."""
        self._released.append(slot_id)
        if self._releaser is None or self._releaser.done():
            self._releaser = asyncio.get_running_loop().create_task(
                self._write_releases(), name="rate slots released"
            )

    async def _write_releases(self) -> None:
        while self._released:
            slot_ids, self._released = self._released, []
            try:
                async with asyncio.timeout(self._db_timeout_s):
                    await self._pool.execute(_RELEASE, self._app_id, slot_ids, self._window_s)
            except Exception as exc:
                # They count until their hold ends: later room, never too much.
                log.warning("rate_slots_not_released", count=len(slot_ids), error=repr(exc))
