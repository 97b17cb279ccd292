"""Samples what the metrics cannot count: queue depths and ages, and whether the broker and the
database answer, every ``monitor_interval_s``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.db import answers
from bridge.headers import head_age
from bridge.metrics import Metrics

log = structlog.get_logger(__name__)

# A work queue's age comes from what its consumer holds (see Consumer.oldest_held_age_s).
HeldAge = Callable[[], float | None]


async def monitor(
    connection: AbstractConnection,
    metrics: Metrics,
    *,
    work_queues: dict[str, HeldAge],
    dead_letter_queues: Sequence[str] = (),
    other_queues: Sequence[str] = (),
    pool: asyncpg.Pool | None = None,
    interval_s: float,
    timeout_s: float = 5.0,
) -> None:
    """Sample until cancelled. A failed sample is logged and retried at the next interval."""
    while True:
        metrics.broker_connected.set(0 if connection.is_closed else 1)
        if pool is not None:
            metrics.database_connected.set(1 if await answers(pool, timeout_s) else 0)
        if not connection.is_closed:
            try:
                async with asyncio.timeout(timeout_s * 4):
                    await _sample_queues(
                        connection, metrics, work_queues, dead_letter_queues, other_queues
                    )
            except (TimeoutError, aio_pika.exceptions.AMQPError, RuntimeError, OSError) as exc:
                log.warning("queue_sample_failed", error=repr(exc))
        await asyncio.sleep(interval_s)


async def _sample_queues(
    connection: AbstractConnection,
    metrics: Metrics,
    work_queues: dict[str, HeldAge],
    dead_letter_queues: Sequence[str],
    other_queues: Sequence[str],
) -> None:
    channel = await connection.channel()
    try:
        for name in [*work_queues, *dead_letter_queues, *other_queues]:
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            metrics.queue_messages.labels(name).set(result.message_count or 0)
            metrics.queue_consumers.labels(name).set(result.consumer_count or 0)
        for name, held_age in work_queues.items():
            metrics.queue_oldest_message_age_seconds.labels(name).set(held_age() or 0.0)
        for name in dead_letter_queues:
            age = await _peek_age(channel, name)
            metrics.queue_oldest_message_age_seconds.labels(name).set(age or 0.0)
    finally:
        with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, OSError):
            await channel.close()


async def _peek_age(channel: AbstractChannel, name: str) -> float | None:
    """The head message's age, read without taking it: it is rejected back into the queue.
    Only for dead-letter queues: they have no delivery limit to count the peek against."""
    queue = await channel.get_queue(name, ensure=False)
    message = await queue.get(no_ack=False, fail=False, timeout=5)
    if message is None:
        return None
    try:
        age, _ = head_age("dlq", message.headers or {}, message.timestamp, datetime.now(UTC))
    finally:
        await message.reject(requeue=True)
    return age
