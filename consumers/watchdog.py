"""The consumer's watchdog: is the broker still delivering to us? If not, register again."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiormq
import structlog

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection, ConsumerTag

    from bridge.config import ConsumerOptions
    from consumers.spec import Counters

log = structlog.get_logger(__name__)
# See runtime._CHANNEL_ERRORS: a lost channel may fail with any Exception.
_CHANNEL_ERRORS = (Exception,)


class WatchdogMixin:
    """Part of :class:`consumers.runtime.Consumer`, kept apart for size: the checks behind
    ``Consumer.ready`` and the re-registration of a consumer the broker forgot."""

    queue_name: str
    publish_timeout_s: float
    options: ConsumerOptions
    counters: Counters
    _connection: AbstractConnection
    _channel: AbstractChannel | None
    _consumer_tag: ConsumerTag | None
    _registered: bool
    _recheck: asyncio.Event
    _watchdog: asyncio.Task[None] | None

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _cancel_consumer(self) -> None:
        raise NotImplementedError

    def _on_channel_change(self, *_: object) -> None:
        # Closed (not ready until a check says so) or reopened by aio-pika (check at once).
        self._registered = False
        self._recheck.set()

    async def _watch(self) -> None:
        """Every ``watchdog_interval_s``, and at once after the consume channel closed or
        reopened: is the broker delivering to us? aio-pika restores channels and consumers
        after a reconnect; a consumer found lost at two checks in a row while the connection
        is up (a restore gone wrong, a cancel it missed) is registered again."""
        lost = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.watchdog_interval_s):
                    await self._recheck.wait()
            self._recheck.clear()
            try:
                lost = await self._check(lost)
            except Exception:
                # A watchdog that died would leave `ready` stuck; the traceback tells what to fix.
                log.exception("consumer_watchdog_failed", queue=self.queue_name)

    async def _check(self, lost: int) -> int:
        """One look; returns how many checks in a row found the consumer lost."""
        self._registered = await self._consuming()
        if self._registered or not self._connection.connected.is_set():
            return 0
        lost += 1
        if lost < 2:  # one check of grace: aio-pika may be restoring the channel right now
            return lost
        await self._register_again()
        return 0

    async def _consuming(self) -> bool:
        channel, tag = self._channel, self._consumer_tag
        if channel is None or tag is None or channel.is_closed:
            return False
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                underlay = await channel.get_underlay_channel()
        except _CHANNEL_ERRORS:
            return False
        return isinstance(underlay, aiormq.Channel) and tag in underlay.consumers

    async def _register_again(self) -> None:
        """Fresh channels and a new consumer; the old tag is cancelled first, so that aio-pika
        cannot restore it beside the new one. Deliveries of the old channel are dropped (the
        broker redelivers them)."""
        log.warning("consumer_lost", queue=self.queue_name, action="registering again")
        await self._cancel_consumer()
        await self._close()
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                await self._open()
        except _CHANNEL_ERRORS as exc:
            log.warning("consumer_register_failed", queue=self.queue_name, error=repr(exc))
            return
        self.counters.reregistered += 1
        log.info("consumer_registered_again", queue=self.queue_name)

    async def _stop_watchdog(self) -> None:
        task, self._watchdog = self._watchdog, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
