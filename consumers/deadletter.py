"""Dead-lettering: a confirmed copy of a failed message, with why, when and how often it failed
in its headers (DESIGN.md promise 4)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from pamqp.commands import Basic

from bridge.amqp import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_FIRST_FAILURE,
    HEADER_ORIGINAL_QUEUE,
)

log = structlog.get_logger(__name__)

# Set by quorum queues on redelivery; folded into x-attempts so a replay starts clean.
_DELIVERY_COUNT = "x-delivery-count"
_MAX_ERROR_CHARS = 1_000


class DeadLetterFailed(Exception):
    """The dead-letter exchange did not confirm the copy."""


class DeadLetterPublisher:
    """Publishes copies of one work queue's failed messages to its dead-letter queue.

    ``exchange`` must belong to a channel with publisher confirms; every publish waits,
    bounded by ``timeout_s``, for the broker to confirm the copy is stored."""

    def __init__(
        self, exchange: AbstractExchange, *, routing_key: str, queue: str, timeout_s: float
    ) -> None:
        self._exchange = exchange
        self._routing_key = routing_key
        self._queue = queue
        self._timeout_s = timeout_s

    async def publish(self, delivery: AbstractIncomingMessage, error: str) -> None:
        """Return once the copy is confirmed; raise otherwise (the caller retries)."""
        message = aio_pika.Message(
            delivery.body,
            headers=dead_letter_headers(delivery.headers, error, self._queue),
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            timestamp=delivery.timestamp,
            type=delivery.type,
            app_id=delivery.app_id,
        )
        # mandatory: a missing dead-letter queue must fail the publish, not drop the copy.
        confirmation = await self._exchange.publish(
            message, self._routing_key, mandatory=True, timeout=self._timeout_s
        )
        if not isinstance(confirmation, Basic.Ack):
            raise DeadLetterFailed(f"not stored: {type(confirmation).__name__}")
        log.info(
            "message_dead_lettered",
            queue=self._queue,
            message_id=delivery.message_id,
            error=error[:_MAX_ERROR_CHARS],
        )


def dead_letter_headers(original: dict[str, Any] | None, error: str, queue: str) -> dict[str, Any]:
    """The original headers plus the error, attempts, first-failure and dead-lettering times and
    the original queue. A message that failed before (replayed from the dead-letter queue) keeps
    its first-failure time and adds up its attempts."""
    headers = dict(original or {})
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    deliveries = _as_int(headers.pop(_DELIVERY_COUNT, 0)) + 1
    headers[HEADER_ERROR] = error[:_MAX_ERROR_CHARS]
    headers[HEADER_ATTEMPTS] = _as_int(headers.get(HEADER_ATTEMPTS, 0)) + deliveries
    headers.setdefault(HEADER_FIRST_FAILURE, now)
    headers[HEADER_DEAD_LETTERED_AT] = now
    headers[HEADER_ORIGINAL_QUEUE] = queue
    return headers


def _as_int(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0
