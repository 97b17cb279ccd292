"""Helpers for the consumer tests: events as the ingress publishes them, publishing, and
reading queues; every wait bounded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika

from bridge.amqp import ROUTING_KEY_BY_CHANNEL, topology
from bridge.config import Settings
from consumers.runtime import Consumer
from schemas.subscription import SubscriptionStatusChanged
from tests.conftest import TEST_APP_ID

BASE_DATE = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)


def make_event(
    address: str = "jan.kowalski@example.com",
    *,
    status: int | None = 1,
    at: datetime | timedelta = BASE_DATE,
    event_id: str | None = None,
    channel: str = "email",
    app_id: str = TEST_APP_ID,
    reason: int | None = 10,
) -> SubscriptionStatusChanged:
    """A status change as the ingress publishes it; ``at`` may be an offset from BASE_DATE."""
    event_date = BASE_DATE + at if isinstance(at, timedelta) else at
    return SubscriptionStatusChanged.model_validate(
        {
            "app_id": app_id,
            "channel": channel,
            "address": address,
            "status": status,
            "reason": reason,
            "event_id": event_id or f"evt-{uuid.uuid4().hex}",
            "event_date": event_date,
            "event_date_raw": event_date.strftime("%Y-%m-%d %H:%M:%S"),
            "received_at": datetime.now(UTC),
            "protocol": "NATIVE_5",
        }
    )


async def publish(
    connection: aio_pika.abc.AbstractConnection,
    settings: Settings,
    messages: Iterable[SubscriptionStatusChanged | bytes],
    *,
    channel: str = "email",
) -> None:
    """Publish events (or raw bodies, routed as ``channel``) persistent and confirmed, in order."""
    amqp_channel = await connection.channel(publisher_confirms=True)
    async with amqp_channel:
        exchange = await amqp_channel.get_exchange(topology(settings).webhook_exchange)
        pending = []
        for message in messages:
            if isinstance(message, bytes):
                body, routing_key, message_id = message, ROUTING_KEY_BY_CHANNEL[channel], None
            else:
                body = message.model_dump_json().encode()
                routing_key = ROUTING_KEY_BY_CHANNEL[message.channel]
                message_id = message.event_id
            amqp_message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
            )
            pending.append(exchange.publish(amqp_message, routing_key, timeout=10))
        # One channel keeps the order; gathering the confirms keeps 1,000 publishes fast.
        await asyncio.gather(*pending)


async def ready_count(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """Messages waiting in ``queue`` (delivered-but-unacked ones not included)."""
    channel = await connection.channel()
    async with channel:
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count is not None
        return declared.declaration_result.message_count


async def take_all(
    connection: aio_pika.abc.AbstractConnection, queue: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in ``queue``, removed from it."""
    channel = await connection.channel()
    async with channel:
        source = await channel.get_queue(queue)
        taken = []
        while (message := await source.get(no_ack=True, fail=False, timeout=5)) is not None:
            taken.append(message)
        return taken


async def run_burst(consumer: Consumer, timeout_s: float = 20.0) -> Consumer:
    """Enter the consumer, handle everything queued, close it; bounded by ``timeout_s``."""
    async with asyncio.timeout(timeout_s), consumer:
        await consumer.run(burst=True)
    return consumer


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` (sync or async) until it is true; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
