"""Confirmed publishing, the one way the bridge publishes: a message counts as sent only when
the broker has confirmed it (the ingress, the relay, the dispatcher, the runtime's dead-letter
and retry copies, and ``dlq replay`` all go through :func:`publish_confirmed`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from pamqp.commands import Basic

log = structlog.get_logger(__name__)

# The least time between two moves of a publisher to a new channel after nacks: a move made
# before the new leader was elected can be stale again, and the next one is not.
RENEW_INTERVAL_S = 0.25


class PublishFailed(Exception):
    """The broker did not confirm the message (unreachable, refused, unroutable or too slow).

    ``timed_out``: no answer in time (the message may have been stored after all);
    ``refused``: the broker answered, and not with an ack ("nacked", "returned as unroutable");
    neither: the channel or connection was lost (the cause is chained)."""

    def __init__(self, reason: str, *, timed_out: bool = False, refused: str | None = None) -> None:
        super().__init__(reason)
        self.timed_out = timed_out
        self.refused = refused


async def publish_confirmed(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    *,
    timeout_s: float,
    mandatory: bool = True,
) -> None:
    """Publish ``message`` and return once the broker confirmed it stored it; raise
    :class:`PublishFailed` otherwise. ``exchange`` must belong to a channel with publisher
    confirms. ``mandatory`` makes an unroutable message a failure instead of a silent drop."""
    try:
        confirmation = await exchange.publish(
            message, routing_key, mandatory=mandatory, timeout=timeout_s
        )
    except TimeoutError:
        raise PublishFailed(f"no confirm within {timeout_s:g}s", timed_out=True) from None
    except aiormq.exceptions.DeliveryError as exc:
        # How aiormq answers a nack, on a channel that does not turn returns into errors too.
        refused = "nacked" if isinstance(exc.frame, Basic.Nack) else "returned as unroutable"
        why = f"broker did not store the message ({refused})"
        raise PublishFailed(why, refused=refused) from exc
    except Exception as exc:
        # Not only aio-pika's errors, ConnectionError and RuntimeError: aiormq fails a
        # pending publish with the bare Exception class when its channel closes without an
        # error of its own. Unconfirmed either way.
        raise PublishFailed(repr(exc)) from exc
    # Basic.Ack is the only answer that means stored; a returned message means unroutable.
    if not isinstance(confirmation, Basic.Ack):
        why = "nacked" if isinstance(confirmation, Basic.Nack) else "returned as unroutable"
        raise PublishFailed(f"broker did not store the message ({why})", refused=why)


def copy_of(
    delivery: AbstractIncomingMessage, headers: Mapping[str, Any], *, message_id: str | None = None
) -> aio_pika.Message:
    """A persistent copy of ``delivery`` with new ``headers`` and every property kept. aiormq
    matches a broker's return to its publish by message_id: a copy without one would pass for
    a confirmed one if unroutable, so ``message_id`` gives one where the delivery has none."""
    return aio_pika.Message(
        delivery.body,
        headers=dict(headers),
        content_type=delivery.content_type,
        content_encoding=delivery.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=delivery.message_id or message_id,
        correlation_id=delivery.correlation_id,
        timestamp=delivery.timestamp,
        type=delivery.type,
        app_id=delivery.app_id,
        priority=delivery.priority,
    )


class ConfirmedPublisher:
    """Publishes persistent messages to one exchange and waits, bounded, for each confirm.

    Publishes run concurrently (one confirm per message, many in flight); a second publish of
    a ``message_id`` already in flight waits for the first instead of racing it.

    Given its ``connection``, a publisher whose message is nacked moves to a new channel of
    it (at most once per :data:`RENEW_INTERVAL_S`): on RabbitMQ 3.10 a channel opened while
    a quorum queue's leader was down goes on nacking every message for that queue after a new
    leader is elected, while a new channel reaches the new leader at once (measured on a
    three-node cluster: nacks for over 15 s on the old channel, none on a new one)."""

    def __init__(
        self,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        timeout_s: float,
        *,
        mandatory: bool = True,
        connection: AbstractConnection | None = None,
        on_return_raises: bool = False,
    ) -> None:
        self._channel = channel
        self._exchange = exchange
        self._timeout_s = timeout_s
        # An unroutable message is an error, not a silent drop: the bridge's own topology is
        # missing. Off for an exchange of the shop's, whose queues are the shop's to bind.
        self._mandatory = mandatory
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self._connection = connection
        self._on_return_raises = on_return_raises
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -RENEW_INTERVAL_S
        self.renewals = 0

    @property
    def ready(self) -> bool:
        return not self._channel.is_closed

    async def publish(
        self,
        body: bytes,
        *,
        routing_key: str,
        message_id: str,
        headers: Mapping[str, Any] | None = None,
        message_type: str | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Publish and return once confirmed; raise :class:`PublishFailed` otherwise."""
        pending = self._in_flight.get(message_id)
        if pending is not None:
            # shield: a caller that gives up must not cancel the other caller's publish.
            await asyncio.shield(pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[message_id] = future
        try:
            await self._publish(body, routing_key, message_id, headers, message_type, content_type)
        except BaseException as exc:
            failure = exc if isinstance(exc, PublishFailed) else PublishFailed(repr(exc))
            future.set_exception(failure)
            future.exception()  # mark it retrieved: often nobody else is waiting
            raise
        else:
            future.set_result(None)
        finally:
            del self._in_flight[message_id]

    async def _publish(
        self,
        body: bytes,
        routing_key: str,
        message_id: str,
        headers: Mapping[str, Any] | None,
        message_type: str | None,
        content_type: str,
    ) -> None:
        if self._channel.is_closed:
            raise PublishFailed("channel closed")
        message = aio_pika.Message(
            body,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            type=message_type,
            # The consumers read a message's age from it (queue_oldest_message_age_seconds).
            timestamp=datetime.now(UTC),
        )
        # A 503, never a 500, when unconfirmed (docs/design.md promise 1).
        try:
            await publish_confirmed(
                self._exchange,
                message,
                routing_key,
                timeout_s=self._timeout_s,
                mandatory=self._mandatory,
            )
        except PublishFailed as failed:
            if failed.refused == "nacked":
                self._renew_soon()
            raise

    def _renew_soon(self) -> None:
        now = time.monotonic()
        if self._connection is None or self._renewing is not None:
            return
        if now - self._renewed_at < RENEW_INTERVAL_S:
            return
        self._renewed_at = now
        self._renewing = asyncio.create_task(self._renew(self._connection))

    async def _renew(self, connection: AbstractConnection) -> None:
        old = self._channel
        try:
            async with asyncio.timeout(self._timeout_s):
                channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=self._on_return_raises
                )
                exchange = await channel.get_exchange(self._exchange.name, ensure=False)
        except Exception as exc:  # the next nack tries again; the old channel goes on meanwhile
            log.warning("publish_channel_not_renewed", error=repr(exc))
            return
        finally:
            self._renewing = None
        self._channel, self._exchange = channel, exchange
        self.renewals += 1
        log.info("publish_channel_renewed", exchange=exchange.name)
        # Its publishes in flight get their answers (or their timeout) first.
        await asyncio.sleep(self._timeout_s)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.close(), self._timeout_s)
