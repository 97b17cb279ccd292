"""Is the broker still delivering to a consumer? A watchdog looks every so often, and has the
consumer registered again when it finds it lost while the connection is up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


class Watchdog:
    """Looks every ``interval_s``, and at once after :meth:`poke`. aio-pika restores channels
    and consumers after a reconnect; a consumer found lost at two looks in a row while the
    connection is up (a restore gone wrong, a cancel it missed) is registered again.

    :param name: the consumer's queue, for the logs.
    :param timeout_s: bound on one look; a look that takes longer finds the consumer lost.
    :param consuming: does the broker deliver to the consumer now?
    :param connected: is the connection up? (If not, aio-pika is on it: nothing to do.)
    :param register_again: a fresh registration (each step bounded by its owner); True once
        the consumer is registered again.
    """

    def __init__(
        self,
        name: str,
        interval_s: float,
        timeout_s: float,
        consuming: Callable[[], Awaitable[bool]],
        connected: Callable[[], bool],
        register_again: Callable[[], Awaitable[bool]],
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._consuming = consuming
        self._connected = connected
        self._register_again = register_again
        # Whether the consumer was registered at the last look: ``Consumer.ready`` reads it.
        self.registered = False
        self._recheck = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Watch a consumer that has just registered."""
        self.registered = True
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name=f"watchdog {self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def poke(self, *_: object) -> None:
        """The consume channel closed or was reopened (a channel callback, hence the
        arguments): not registered until a look says so, and look at once."""
        self.registered = False
        self._recheck.set()

    async def _watch(self) -> None:
        lost = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._recheck.wait()
            self._recheck.clear()
            try:
                lost = await self._check(lost)
            except Exception:
                # A watchdog that died would leave `ready` stuck; the traceback tells what to fix.
                log.exception("consumer_watchdog_failed", queue=self.name)

    async def _check(self, lost: int) -> int:
        """One look; returns how many looks in a row found the consumer lost."""
        self.registered = await self._look()
        if self.registered or not self._connected():
            return 0
        lost += 1
        if lost < 2:  # one look of grace: aio-pika may be restoring the channel right now
            return lost
        log.warning("consumer_lost", queue=self.name, action="registering again")
        if await self._register_again():
            self.registered = True
        return 0

    async def _look(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._consuming()
        except TimeoutError:
            return False
