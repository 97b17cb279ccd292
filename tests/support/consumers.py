"""Helpers for the consumer tests: events as the ingress and the shop publish them, publishing,
reading queues and running the trace forwarder; every wait bounded."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg

from bridge.amqp import ROUTING_KEY_BY_CHANNEL, topology
from bridge.config import Settings
from bridge.metrics import Metrics
from consumers import subscriptions, traces
from consumers.runtime import Consumer
from consumers.service import consumer_of, serve
from schemas.subscription import SubscriptionStatusChanged
from tests.support.apps import TEST_APP_ID

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


async def apply_burst(
    connection: aio_pika.abc.AbstractConnection,
    pool: asyncpg.Pool,
    settings: Settings,
    timeout_s: float = 20.0,
    metrics: Metrics | None = None,
) -> Consumer:
    """The subscription consumer, built as ``consume subscriptions`` builds it (the shops'
    tables checked, a dispatcher running): everything queued handled, then closed."""
    async with consumer_of(
        subscriptions.PART, settings, connection, pool, metrics=metrics
    ) as consumer:
        return await run_burst(consumer, timeout_s)


def serve_subscriptions(
    settings: Settings, stopping: asyncio.Event, **options: Any
) -> Coroutine[Any, Any, None]:
    """``consume subscriptions`` in this process, on its own connection and pool."""
    return serve(subscriptions.PART, settings, stopping, **options)


def serve_traces(
    settings: Settings, stopping: asyncio.Event, **options: Any
) -> Coroutine[Any, Any, None]:
    """``consume traces`` in this process, on its own connection and pool."""
    return serve(traces.PART, settings, stopping, **options)


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


# --- The trace forwarder: the shop's events on the platform exchange, and a consumer of them.

# Short tiers and no breaker unless a test asks for them, so that retries take fractions of a
# second and every failure counts.
TRACE_FAST = {
    "retry_tiers_s": (0.2, 0.5),
    "flush_interval_ms": 10,
    "breaker_failures": 1000,
    "timeout_s": 5.0,
    "connect_timeout_s": 2.0,
    "retry_initial_backoff_s": 0.05,
    "retry_max_backoff_s": 0.2,
    "drain_timeout_s": 5.0,
}


def shop_event(
    email: str = "jan.kowalski@example.com",
    *,
    status: int | None = 1,
    at: datetime | timedelta | None = None,
    event_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A CustomerSubscriptionChanged as the shop publishes it (JSON-ready). ``at`` defaults to
    now, and an offset is taken from now: echo and no-op verdicts compare with the database
    clock. Other keyword arguments are optional event fields (``app_id``, ``phone``...)."""
    now = datetime.now(UTC)
    occurred_at = now + at if isinstance(at, timedelta) else (at or now)
    return {
        "event_id": event_id or f"shop-{uuid.uuid4().hex}",
        "occurred_at": occurred_at.isoformat(),
        "email": email,
        "subscriber_status": status,
        **fields,
    }


def platform_message(event: dict[str, Any] | bytes, *, with_id: bool = False) -> aio_pika.Message:
    """A shop event (or a raw body) as the shop publishes it: JSON, persistent; ``with_id``
    gives it the event's id as its message_id."""
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    message_id = str(event["event_id"]) if with_id and isinstance(event, dict) else None
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
    )


async def publish_platform(
    connection: aio_pika.abc.AbstractConnection,
    settings: Settings,
    messages: Iterable[dict[str, Any] | bytes],
) -> None:
    """Publish shop events (or raw bodies) to the platform exchange, persistent and confirmed,
    in order; the exchange must be declared (``declare_trace_topology``)."""
    amqp_channel = await connection.channel(publisher_confirms=True)
    async with amqp_channel:
        exchange = await amqp_channel.get_exchange(settings.platform_exchange)
        pending = []
        for message in messages:
            pending.append(
                exchange.publish(
                    platform_message(message), settings.platform_routing_key, timeout=10
                )
            )
        await asyncio.gather(*pending)


@asynccontextmanager
async def trace_consumer(
    connection: aio_pika.abc.AbstractConnection, pool: asyncpg.Pool, settings: Settings
) -> AsyncIterator[Consumer]:
    """The trace forwarder's consumer, built as ``consume traces`` builds it and entered (the
    forwarder is ``consumer.spec.handler``); closed on exit."""
    async with consumer_of(traces.PART, settings, connection, pool) as consumer, consumer:
        yield consumer


@asynccontextmanager
async def running(consumer: Consumer, timeout_s: float = 30.0) -> AsyncIterator[Consumer]:
    """``consumer.run()`` in a task for the block (retries come back from their tier queues, so
    a burst run, which returns once the work queue is idle, would stop too early); then stop
    and wait for the run to end. The whole block is bounded by ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        task = asyncio.create_task(consumer.run())
        try:
            yield consumer
        finally:
            await consumer.stop()
            await task


async def forward_burst(connection, pool, settings, timeout_s=20.0) -> Consumer:
    """Forward everything queued, then return the consumer (its counters) once idle."""
    async with asyncio.timeout(timeout_s), trace_consumer(connection, pool, settings) as consumer:
        await consumer.run(burst=True)
    return consumer


async def depths(connection, settings) -> dict[str, int]:
    """Ready messages in the work queue, its dead-letter queue and every retry tier."""
    names = topology(settings)
    work = names.traces_queue
    queues = [
        work,
        names.dead_letter_queue(work),
        *names.retry_queues(settings.traces.retry_tiers_s),
    ]
    return {queue: await ready_count(connection, queue) for queue in queues}


@asynccontextmanager
async def serving_both(settings: Settings, timeout_s: float = 30.0) -> AsyncIterator[Settings]:
    """The subscription consumer and the trace forwarder serving ``settings`` as their
    processes do, until the block ends (then stopped, and awaited within ``timeout_s``)."""
    stopping = asyncio.Event()
    tasks = [
        asyncio.create_task(serve_subscriptions(settings, stopping)),
        asyncio.create_task(serve_traces(settings, stopping)),
    ]
    try:
        yield settings
    finally:
        stopping.set()
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*tasks)
