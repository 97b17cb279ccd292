"""Samples what the metrics cannot count: queue depths and ages, and whether the broker and the
database answer, every ``monitor_interval_s``. It never reads a message: a work queue's age is
what its consumer holds, a parked message's age is kept by the bridge (bridge/parked.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import structlog
from aio_pika.abc import AbstractConnection

from bridge.db import DATABASE_ERRORS, answers
from bridge.metrics import Metrics
from bridge.parked import Ledger, QueueAge, clock

log = structlog.get_logger(__name__)

# A work queue's age comes from what its consumer holds (see Consumer.oldest_held_age_s).
HeldAge = Callable[[], float | None]


async def monitor(
    connection: AbstractConnection,
    metrics: Metrics,
    *,
    work_queues: dict[str, HeldAge],
    parked_queues: Sequence[str] = (),
    pool: asyncpg.Pool | None = None,
    interval_s: float,
    timeout_s: float = 5.0,
) -> None:
    """Sample until cancelled. A failed sample is logged and retried at the next interval.

    ``parked_queues`` (dead-letter queues and retry tiers) are counted, never read: their
    ages come from the ledger in ``pool`` (bridge/parked.py), which forgets a queue found
    empty. Without a pool their age reads 0."""
    ledger = Ledger(pool, timeout_s=timeout_s) if pool is not None else None
    while True:
        metrics.broker_connected.set(0 if connection.is_closed else 1)
        if pool is not None:
            metrics.database_connected.set(1 if await answers(pool, timeout_s) else 0)
        if not connection.is_closed:
            try:
                async with asyncio.timeout(timeout_s * 4):
                    await _sample(connection, metrics, work_queues, parked_queues, ledger)
            except Exception as exc:
                # Any: aiormq fails a channel opened as the connection drops with the bare
                # Exception class, and a sample is never worth its process (it killed a
                # consumer in tests/faults/test_broker_cuts.py).
                log.warning("queue_sample_failed", error=repr(exc))
        await asyncio.sleep(interval_s)


async def _sample(
    connection: AbstractConnection,
    metrics: Metrics,
    work_queues: dict[str, HeldAge],
    parked_queues: Sequence[str],
    ledger: Ledger | None,
) -> None:
    # Taken before the counts: a queue counted empty had nothing parked before this.
    before = await clock(ledger)
    empty = await _count(connection, metrics, [*work_queues, *parked_queues])
    for name, held_age in work_queues.items():
        metrics.queue_oldest_message_age_seconds.labels(name).set(held_age() or 0.0)
    ages = await _parked_ages(ledger, parked_queues, empty, before)
    now = datetime.now(UTC)
    for name in parked_queues:
        age = ages.get(name)
        seconds = max((now - age.oldest).total_seconds(), 0.0) if age else 0.0
        metrics.queue_oldest_message_age_seconds.labels(name).set(seconds)


async def _count(
    connection: AbstractConnection, metrics: Metrics, names: Sequence[str]
) -> dict[str, bool]:
    """Each queue's depth and consumers into ``metrics``; whether it is empty: no message
    ready and no consumer that may hold some (a passive declare counts only the ready ones,
    and a ``dlq list`` holds every message while it reads)."""
    empty = {}
    channel = await connection.channel()
    try:
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            ready, consumers = result.message_count or 0, result.consumer_count or 0
            metrics.queue_messages.labels(name).set(ready)
            metrics.queue_consumers.labels(name).set(consumers)
            empty[name] = ready == 0 and consumers == 0
    finally:
        # Shielded: a close cut short (the sampler cancelled) frees the channel's number while
        # the broker still has the channel open; the next channel opened on the connection,
        # which is its process's, then gets CHANNEL_ERROR and the whole connection is closed.
        closing = asyncio.ensure_future(channel.close())
        with contextlib.suppress(Exception):
            await asyncio.shield(closing)
    return empty


async def _parked_ages(
    ledger: Ledger | None,
    names: Sequence[str],
    empty: dict[str, bool],
    before: datetime | None,
) -> dict[str, QueueAge]:
    """The ledger's ages of the queues that hold messages; the emptied ones forgotten."""
    if ledger is None or before is None:
        return {}
    try:
        await ledger.forget([n for n in names if empty.get(n)], parked_before=before)
        return await ledger.ages([n for n in names if not empty.get(n, True)])
    except DATABASE_ERRORS as exc:
        log.warning("parked_ages_unread", error=repr(exc))
        return {}
