"""The way ``backfill`` and ``reconcile --repair`` hand shop rows to the trace forwarder: confirmed
publishes onto its background lane (``<prefix>.traces.backfill``), never more than ``max_depth``
waiting in it, so that millions of rows do not sit in the broker's memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import structlog
from aio_pika.abc import AbstractChannel

from bridge.amqp import declare_trace_topology, topology
from bridge.broker import connect
from bridge.config import Settings
from bridge.publishing import ConfirmedPublisher
from schemas.shop_row import SHOP_ROW_TYPE, ShopRow

log = structlog.get_logger(__name__)


class RowLane:
    """Publishes rows to the background lane, confirmed, in groups sent concurrently."""

    def __init__(
        self,
        channel: AbstractChannel,
        publisher: ConfirmedPublisher,
        queue: str,
        *,
        max_depth: int,
        poll_s: float = 0.5,
        timeout_s: float = 10.0,
    ) -> None:
        self._channel = channel
        self._publisher = publisher
        self.queue = queue
        self._max_depth = max_depth
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self.waited_s = 0.0  # time spent waiting for the forwarder to make room

    async def depth(self) -> int:
        """Messages ready in the lane, from a passive declaration (which moves none)."""
        # On the channel itself: a robust channel answers a passive declare of a queue it
        # declared with that queue's first declaration (its count then, never again).
        underlay = await self._channel.get_underlay_channel()
        async with asyncio.timeout(self._timeout_s):
            declared = await underlay.queue_declare(self.queue, passive=True)
        return int(declared.message_count or 0)

    async def send(self, rows: Sequence[ShopRow]) -> None:
        """Publish ``rows`` and return once the broker confirmed every one (raises
        :class:`bridge.publishing.PublishFailed` otherwise: then any of them may be stored,
        and sending them again is harmless, each row's ``event_id`` being its message id)."""
        if not rows:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        # The broker tells the depth only when asked: polled, there is nothing to wait on.
        while await self.depth() + len(rows) > max(self._max_depth, len(rows)):  # noqa: ASYNC110
            await asyncio.sleep(self._poll_s)
        self.waited_s += loop.time() - started
        # One id at a time in flight: a file may hold the same row twice.
        unique = {row.event_id: row for row in rows}
        await asyncio.gather(
            *(
                self._publisher.publish(
                    row.model_dump_json().encode(),
                    routing_key=self.queue,
                    message_id=event_id,
                    message_type=SHOP_ROW_TYPE,
                )
                for event_id, row in unique.items()
            )
        )


@asynccontextmanager
async def open_lane(
    settings: Settings, name: str, *, max_depth: int, stopping: asyncio.Event | None = None
) -> AsyncIterator[RowLane]:
    """A :class:`RowLane` on its own connection named ``name``; the trace topology declared
    (so rows published before any forwarder started wait in their lane)."""
    robust = await connect(settings, name, stopping=stopping)
    async with robust as connection:
        channel = await connection.channel(publisher_confirms=True)
        async with channel:
            await declare_trace_topology(channel, settings)
            exchange = channel.default_exchange
            publisher = ConfirmedPublisher(channel, exchange, settings.publish_timeout_s)
            yield RowLane(
                channel,
                publisher,
                topology(settings).backfill_queue,
                max_depth=max_depth,
                timeout_s=settings.publish_timeout_s,
            )
