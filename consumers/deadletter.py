"""Copies of failed messages, confirmed: to the dead-letter queue with why, when and how often
it failed (DESIGN.md promise 4), or to a retry tier that hands it back later."""

from __future__ import annotations

from collections.abc import Sequence
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
    """The exchange did not confirm the copy."""


async def publish_copy(
    exchange: AbstractExchange,
    delivery: AbstractIncomingMessage,
    *,
    routing_key: str,
    headers: dict[str, Any],
    timeout_s: float,
) -> None:
    """Publish ``delivery`` again with new ``headers``; return once the broker confirmed it."""
    message = aio_pika.Message(
        delivery.body,
        headers=headers,
        content_type=delivery.content_type,
        content_encoding=delivery.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=delivery.message_id,
        correlation_id=delivery.correlation_id,
        timestamp=delivery.timestamp,
        type=delivery.type,
        app_id=delivery.app_id,
    )
    # mandatory: a missing queue must fail the publish, not drop the copy.
    confirmation = await exchange.publish(message, routing_key, mandatory=True, timeout=timeout_s)
    if not isinstance(confirmation, Basic.Ack):
        raise DeadLetterFailed(f"not stored: {type(confirmation).__name__}")


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
        await publish_copy(
            self._exchange,
            delivery,
            routing_key=self._routing_key,
            headers=dead_letter_headers(delivery.headers, error, self._queue),
            timeout_s=self._timeout_s,
        )
        log.info(
            "message_dead_lettered",
            queue=self._queue,
            event_id=delivery.message_id,
            error=error[:_MAX_ERROR_CHARS],
        )


class RetryPublisher:
    """Publishes copies of one work queue's messages to its retry tiers: queues whose TTL
    dead-letters them back to the work queue (no delayed-message plugin on RabbitMQ 3.10, and
    per-message TTLs would hold short delays behind long ones)."""

    def __init__(
        self,
        exchange: AbstractExchange,
        *,
        tiers: Sequence[tuple[float, str]],
        queue: str,
        timeout_s: float,
    ) -> None:
        self._exchange = exchange
        self.tiers = tuple(tiers)  # (delay_s, tier queue name), ascending
        self._queue = queue
        self._timeout_s = timeout_s

    def choose(
        self, attempts: int, after_s: float | None, counts: bool
    ) -> tuple[float, str] | None:
        """The tier for a message that has failed ``attempts`` times, or None when the tiers
        are used up. A server's Retry-After (``after_s``) picks the shortest tier that honours
        it; an uncounted retry (edrone paused, say) waits in the shortest tier that covers it."""
        if not self.tiers or (counts and attempts > len(self.tiers)):
            return None
        if after_s is not None or not counts:
            wanted = after_s or 0.0
            return next((t for t in self.tiers if t[0] >= wanted), self.tiers[-1])
        return self.tiers[attempts - 1]

    async def publish(
        self, delivery: AbstractIncomingMessage, tier: tuple[float, str], error: str, attempts: int
    ) -> None:
        headers = dict(delivery.headers or {})
        headers.pop(_DELIVERY_COUNT, None)
        headers[HEADER_ATTEMPTS] = attempts
        headers[HEADER_ERROR] = error[:_MAX_ERROR_CHARS]
        headers.setdefault(HEADER_FIRST_FAILURE, _now())
        await publish_copy(
            self._exchange,
            delivery,
            routing_key=tier[1],
            headers=headers,
            timeout_s=self._timeout_s,
        )
        log.info(
            "message_retry_scheduled",
            queue=self._queue,
            event_id=delivery.message_id,
            attempts=attempts,
            delay_s=tier[0],
            error=error[:_MAX_ERROR_CHARS],
        )


def attempts_so_far(headers: dict[str, Any] | None, *, this_one_counts: bool = True) -> int:
    """Failed attempts including this delivery: the recorded ones plus the broker's
    redeliveries (a consumer that died mid-attempt) plus this one, if it counts."""
    headers = headers or {}
    redeliveries = _as_int(headers.get(_DELIVERY_COUNT, 0))
    return _as_int(headers.get(HEADER_ATTEMPTS, 0)) + redeliveries + int(this_one_counts)


def dead_letter_headers(original: dict[str, Any] | None, error: str, queue: str) -> dict[str, Any]:
    """The original headers plus the error, attempts, first-failure and dead-lettering times and
    the original queue. A message that failed before (replayed from the dead-letter queue, or
    back from a retry tier) keeps its first-failure time and adds up its attempts."""
    headers = dict(original or {})
    now = _now()
    headers[HEADER_ATTEMPTS] = attempts_so_far(headers)
    headers.pop(_DELIVERY_COUNT, None)
    headers[HEADER_ERROR] = error[:_MAX_ERROR_CHARS]
    headers.setdefault(HEADER_FIRST_FAILURE, now)
    headers[HEADER_DEAD_LETTERED_AT] = now
    headers[HEADER_ORIGINAL_QUEUE] = queue
    return headers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _as_int(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0
