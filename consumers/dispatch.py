"""The bridge's transactional outbox: messages a consumer decided on inside its transaction
(edrone's changes for the shop's bus, requests to bring edrone to the winner), published,
confirmed, once the transaction has committed, so a crash between the two loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.config import Settings
from bridge.publishing import ConfirmedPublisher
from consumers.outcomes import database_retry

log = structlog.get_logger(__name__)

# One dispatcher at a time per schema publishes, so messages about one address keep their order.
_TURN_SQL = "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.dispatch'))"
_PENDING_SQL = """
SELECT id, exchange, routing_key, message_id, type, body FROM dispatch
WHERE sent_at IS NULL ORDER BY id LIMIT $1
"""
_SENT_SQL = "UPDATE dispatch SET sent_at = now() WHERE id = ANY($1::bigint[])"


class Dispatcher:
    """Publishes the ``dispatch`` rows in id order, confirmed, then marks them sent: at once
    when :meth:`nudge`\\ d after a commit, and every ``poll_interval_s`` for rows another
    process left behind (it crashed, or its broker was away)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        channel: AbstractChannel,
        *,
        poll_interval_s: float,
        batch_size: int,
        publish_timeout_s: float,
        connection: AbstractConnection | None = None,
    ) -> None:
        self._pool = pool
        self._channel = channel
        # Where a nacked publisher opens a new channel (bridge/publishing.py).
        self._connection = connection
        self._poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        self._publish_timeout_s = publish_timeout_s
        self._publishers: dict[str, ConfirmedPublisher] = {}
        self._wake = asyncio.Event()
        self.published = 0

    def nudge(self) -> None:
        """A transaction that wrote rows has committed: publish them now."""
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            self._wake.clear()
            try:
                handled = await self.publish_pending()
            except Exception as exc:
                if database_retry(exc) is None and not isinstance(exc, OSError):
                    log.exception("dispatch_failed")
                else:
                    log.warning("dispatch_failed", error=repr(exc))
                handled = 0
            if handled < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval_s):
                        await self._wake.wait()

    async def publish_pending(self) -> int:
        """One batch: publish the oldest unsent rows and mark them sent, in one transaction
        (a failed publish leaves them all unsent: at least once, by message id)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_TURN_SQL):
                return 0
            rows = await conn.fetch(_PENDING_SQL, self._batch_size)
            if not rows:
                return 0
            # One channel keeps the order of the publishes, confirmed together.
            await asyncio.gather(*(self._publish(row) for row in rows))
            await conn.execute(_SENT_SQL, [row["id"] for row in rows])
        self.published += len(rows)
        return len(rows)

    async def _publish(self, row: asyncpg.Record) -> None:
        publisher = await self._publisher(row["exchange"])
        body = row["body"] if isinstance(row["body"], str) else json.dumps(row["body"])
        await publisher.publish(
            body.encode(),
            routing_key=row["routing_key"],
            message_id=row["message_id"],
            message_type=row["type"],
        )

    async def _publisher(self, exchange_name: str) -> ConfirmedPublisher:
        publisher = self._publishers.get(exchange_name)
        if publisher is None:
            async with asyncio.timeout(self._publish_timeout_s):
                if exchange_name:
                    exchange = await self._channel.get_exchange(exchange_name, ensure=True)
                else:
                    exchange = self._channel.default_exchange
            # The default exchange routes to the bridge's own queues: unroutable there means
            # its topology is missing. The shop's bus is the shop's to bind: a change nobody
            # listens for must not hold up the messages behind it.
            publisher = ConfirmedPublisher(
                self._channel,
                exchange,
                self._publish_timeout_s,
                mandatory=not exchange_name,
                connection=self._connection,
            )
            self._publishers[exchange_name] = publisher
        return publisher


@asynccontextmanager
async def dispatching(
    connection: AbstractConnection, pool: asyncpg.Pool, settings: Settings
) -> AsyncIterator[Dispatcher]:
    """A dispatcher running for the block, on a confirm channel of its own."""
    async with connection.channel(publisher_confirms=True) as channel:
        dispatcher = Dispatcher(
            pool,
            channel,
            poll_interval_s=settings.sync.dispatch_poll_interval_s,
            batch_size=settings.sync.dispatch_batch_size,
            publish_timeout_s=settings.publish_timeout_s,
            connection=connection,
        )
        task = asyncio.create_task(dispatcher.run(), name="dispatch")
        try:
            yield dispatcher
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
