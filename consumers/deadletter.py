"""Copies of failed messages, confirmed: to the dead-letter queue with why, when and how often
it failed (docs/design.md promise 4), or to a retry tier that hands it back later."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from bridge.headers import (
    HEADER_DEAD_LETTERED_AT,
    HEADER_FIRST_FAILURE,
    HEADER_PARKED_IN,
    MAX_ERROR_CHARS,
    as_datetime,
    dead_letter_headers,
    retry_headers,
)
from bridge.parked import Parked
from bridge.publishing import copy_of, publish_confirmed
from consumers.bundles import alone_headers

log = structlog.get_logger(__name__)


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

    async def publish(self, delivery: AbstractIncomingMessage, error: str) -> Parked:
        """Return, once the copy is confirmed, what was parked; raise otherwise (the caller
        retries)."""
        headers = dead_letter_headers(delivery.headers, error, self._queue)
        headers[HEADER_PARKED_IN] = self._routing_key
        message = copy_of(delivery, headers, message_id=_new_id())
        # mandatory: a missing queue must fail the publish, not drop the copy.
        await publish_confirmed(
            self._exchange, message, self._routing_key, timeout_s=self._timeout_s
        )
        log.info(
            "message_dead_lettered",
            queue=self._queue,
            event_id=delivery.message_id,
            error=error[:MAX_ERROR_CHARS],
        )
        return _parked(self._routing_key, message.message_id, headers, HEADER_DEAD_LETTERED_AT)


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
    ) -> Parked:
        """Return, once the copy is confirmed, what was parked; raise otherwise."""
        headers = retry_headers(delivery.headers, error, attempts)
        headers[HEADER_PARKED_IN] = tier[1]
        message = copy_of(delivery, headers, message_id=_new_id())
        await publish_confirmed(self._exchange, message, tier[1], timeout_s=self._timeout_s)
        log.info(
            "message_retry_scheduled",
            queue=self._queue,
            event_id=delivery.message_id,
            attempts=attempts,
            delay_s=tier[0],
            error=error[:MAX_ERROR_CHARS],
        )
        return _parked(tier[1], message.message_id, headers, HEADER_FIRST_FAILURE)


class AlonePublisher:
    """Publishes a bundle's part back to its work ``queue`` as a message of its own, confirmed:
    a part of a bundle the broker redelivers, so that from then on the queue's delivery limit
    counts that webhook's deliveries alone (consumers/bundles.py)."""

    def __init__(self, default_exchange: AbstractExchange, *, queue: str, timeout_s: float) -> None:
        self._exchange = default_exchange
        self._queue = queue
        self._timeout_s = timeout_s

    async def publish(self, part: AbstractIncomingMessage) -> None:
        message = copy_of(part, alone_headers(part), message_id=_new_id())
        await publish_confirmed(self._exchange, message, self._queue, timeout_s=self._timeout_s)
        log.info("bundle_part_requeued", queue=self._queue, event_id=part.message_id)


def _new_id() -> str:
    # For a copy of a message that has none: the confirm is matched by it (bridge.publishing),
    # and the ledger and the dlq commands know the copy by it.
    return uuid.uuid4().hex


def _parked(queue: str, message_id: str | None, headers: Mapping[str, Any], since: str) -> Parked:
    # A first-failure time the message brought along may not parse (it came from outside):
    # the copy's age then counts from now, never failing a copy the broker already confirmed.
    when = as_datetime(headers.get(since)) or datetime.now(UTC)
    assert message_id is not None  # copy_of was given one
    return Parked(queue, message_id, when)
