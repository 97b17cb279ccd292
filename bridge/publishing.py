"""Confirmed publishing: a message counts as sent only when the broker has confirmed it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange
from pamqp.commands import Basic

log = structlog.get_logger(__name__)


class PublishFailed(Exception):
    """The broker did not confirm the message (unreachable, refused, unroutable or too slow)."""


class ConfirmedPublisher:
    """Publishes persistent messages to one exchange and waits, bounded, for each confirm.

    Publishes run concurrently (one confirm per message, many in flight); a second publish of
    a ``message_id`` already in flight waits for the first instead of racing it."""

    def __init__(
        self,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        timeout_s: float,
        *,
        mandatory: bool = True,
    ) -> None:
        self._channel = channel
        self._exchange = exchange
        self._timeout_s = timeout_s
        # An unroutable message is an error, not a silent drop: the bridge's own topology is
        # missing. Off for an exchange of the shop's, whose queues are the shop's to bind.
        self._mandatory = mandatory
        self._in_flight: dict[str, asyncio.Future[None]] = {}

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
            await self._publish(body, routing_key, message_id, headers, message_type)
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
    ) -> None:
        if self._channel.is_closed:
            raise PublishFailed("channel closed")
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            type=message_type,
            # The consumers read a message's age from it (queue_oldest_message_age_seconds).
            timestamp=datetime.now(UTC),
        )
        try:
            confirmation = await self._exchange.publish(
                message, routing_key, mandatory=self._mandatory, timeout=self._timeout_s
            )
        except TimeoutError:
            raise PublishFailed(f"no confirm within {self._timeout_s}s") from None
        except Exception as exc:
            # Not only aio-pika's errors, ConnectionError and RuntimeError: aiormq fails a
            # pending publish with the bare Exception class when its channel closes without an
            # error of its own. Unconfirmed either way: a 503, never a 500 (promise 1).
            raise PublishFailed(repr(exc)) from exc
        # Basic.Ack is the only answer that means stored; a returned message means unroutable.
        if not isinstance(confirmation, Basic.Ack):
            raise PublishFailed(f"broker did not store the message: {type(confirmation).__name__}")
