"""What the trace forwarder's two lanes share: the HTTP session to edrone, each app's rate
limit, which serves live changes first and leaves the background lane (backfill, reconcile)
only what they do not need, over every forwarder process of the schema
(consumers/rate_budget.py), and the breaker, so that edrone failing pauses both lanes."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

import aiohttp
import asyncpg

from bridge.config import Settings
from bridge.part_settings import TraceSettings
from consumers.rate_budget import SharedRateLimiter
from consumers.throttle import Breaker


def create_session(settings: Settings) -> aiohttp.ClientSession:
    """A keep-alive session to edrone, bounded by the configured timeouts; room for both
    lanes' calls at once, so the background never takes a connection live traces need."""
    options = settings.traces
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=options.timeout_s, connect=options.connect_timeout_s),
        connector=aiohttp.TCPConnector(limit=options.concurrency + options.background_concurrency),
        raise_for_status=False,
    )


class NoRoom(Exception):
    """A background call found no room within its wait: live traffic needs the limit."""


class Pacing:
    """The per-app limiters (made on an app's first call, kept in ``pool``'s database) and the
    breaker, for both lanes of a process; :meth:`close` once no call is made any more."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        options = settings.traces
        self._apps = settings.apps
        self._options = options
        self._pool = pool
        self._limiters: dict[str, SharedRateLimiter] = {}
        self.breaker = Breaker(
            failures=options.breaker_failures,
            initial_pause_s=options.breaker_initial_pause_s,
            max_pause_s=options.breaker_max_pause_s,
        )

    @asynccontextmanager
    async def slot(
        self, app_id: str, *, background: bool = False, timeout_s: float | None = None
    ) -> AsyncIterator[float]:
        """Within the app's rate limit for the whole call (see SharedRateLimiter); yields how
        long it waited. :class:`NoRoom` when no slot came within ``timeout_s``."""
        limiter = self._limiter(app_id)
        if limiter is None:
            yield 0.0
            return
        try:
            slot_id, waited = await limiter.acquire(background=background, timeout_s=timeout_s)
        except TimeoutError:
            raise NoRoom(f"no room left by live traces within {timeout_s:.0f} s") from None
        try:
            yield waited
        finally:
            limiter.release(slot_id)

    async def close(self) -> None:
        for limiter in self._limiters.values():
            await limiter.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _limiter(self, app_id: str) -> SharedRateLimiter | None:
        rate = self._apps[app_id].rate_limit_per_s or self._options.rate_limit_per_s
        if not rate:
            return None
        if app_id not in self._limiters:
            self._limiters[app_id] = SharedRateLimiter(
                self._pool,
                app_id,
                rate,
                # A call ends by its timeout; a second more for the answer to be counted.
                hold_s=self._options.timeout_s + 1.0,
                db_timeout_s=self._options.db_timeout_s,
                reserve_fraction=self._options.background_reserve_fraction,
                headroom=self._options.background_headroom,
            )
        return self._limiters[app_id]


def batch_timeout_s(options: TraceSettings, *, background: bool = False) -> float:
    """Enough for a whole batch of the slowest answers, queued behind the concurrency bound and
    the rate limit: a batch timed out is sent again, and edrone would hear twice. A background
    batch waits for room no longer than ``background_max_wait_s``."""
    if background:
        options = background_options(options)
    concurrency = options.background_concurrency if background else options.concurrency
    rounds = math.ceil(options.batch_size / concurrency)
    pacing_s = options.batch_size / options.rate_limit_per_s if options.rate_limit_per_s else 0.0
    if background:
        pacing_s = options.background_max_wait_s
    return rounds * options.timeout_s + pacing_s + 10.0


def background_options(options: TraceSettings) -> TraceSettings:
    """The background lane's runtime numbers: its smaller batches, and room for two of them."""
    size = options.background_batch_size
    return options.model_copy(update={"batch_size": size, "prefetch": 2 * size})
