"""Subscription consumer: time to drain preloaded events (10% duplicates, 10% older than the
stored state) into PostgreSQL, beside a raw aio-pika consume-and-ack of the same queue contents
and a naive consumer that commits one transaction per message.

One publish fills three queues bound alike: the consumer's own, one for the raw consumer and a
short one (``x-max-length``: it keeps the newest messages) for the naive consumer, whose rate
is measured on that sample and extrapolated to the whole drain."""

from __future__ import annotations

import asyncio
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from benchmarks import deployment as d
from benchmarks.report import Row, Target
from benchmarks.worker import Worker
from bridge.amqp import ROUTING_KEY_BY_CHANNEL, topology
from bridge.broker import connect
from bridge.config import Settings
from bridge.db import create_pool
from bridge.migrate import migrate
from consumers import subscriptions
from consumers.outcomes import InvalidMessage
from consumers.service import consumer_of
from consumers.subscriptions import decode
from schemas.subscription import SubscriptionStatusChanged

BASE_DATE = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
STORED_DATE = BASE_DATE + timedelta(days=30)


@dataclass(frozen=True)
class Mix:
    """The preloaded stream: ``fresh`` new subscribers, ``older`` changes already superseded in
    the stored state, ``duplicates`` copies of earlier messages (same event id)."""

    total: int
    seed: int = 5

    @property
    def older(self) -> int:
        return self.total // 10

    @property
    def duplicates(self) -> int:
        return self.total // 10

    @property
    def fresh(self) -> int:
        return self.total - self.older - self.duplicates


def _event(index: int, address: str, event_date: datetime) -> SubscriptionStatusChanged:
    return SubscriptionStatusChanged.model_validate(
        {
            "app_id": d.APP_ID,
            "channel": "email",
            "address": address,
            "status": index % 2,
            "reason": 10,
            "event_id": f"drain-{index:07d}",
            "event_date": event_date,
            "event_date_raw": event_date.strftime("%Y-%m-%d %H:%M:%S"),
            "received_at": datetime.now(UTC),
            "protocol": "NATIVE_5",
        }
    )


def stream(mix: Mix) -> list[bytes]:
    """The message bodies, in publish order (the same for every repeat)."""
    rng = random.Random(mix.seed)
    bodies = []
    for index in range(mix.fresh):
        moment = BASE_DATE + timedelta(seconds=rng.randrange(86_400))
        bodies.append(_event(index, f"new-{index}@example.com", moment).model_dump_json().encode())
    for index in range(mix.older):
        event = _event(mix.fresh + index, _stored_address(index), BASE_DATE)
        bodies.append(event.model_dump_json().encode())
    rng.shuffle(bodies)
    for _ in range(mix.duplicates):
        # A copy lands after its original: a redelivery or edrone's retry.
        position = rng.randrange(1, len(bodies))
        bodies.insert(rng.randrange(position, len(bodies) + 1), bodies[rng.randrange(position)])
    return bodies


def _stored_address(index: int) -> str:
    return f"stored-{index}@example.com"


async def preload(amqp_url: str, exchange_name: str, mix: Mix, in_flight: int = 256) -> float:
    """Publish the stream, persistent and confirmed; seconds taken."""
    bodies = stream(mix)
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name)
        routing_key = ROUTING_KEY_BY_CHANNEL["email"]
        started = time.perf_counter()
        pending = iter(bodies)

        async def publisher() -> None:
            for body in pending:
                message = aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await exchange.publish(message, routing_key, timeout=30)

        await asyncio.gather(*(publisher() for _ in range(in_flight)))
        return time.perf_counter() - started


async def reset_database(settings: Settings, schema: str, mix: Mix) -> None:
    """Empty ledger, inbox and sync state, then the stored state that makes ``mix.older``
    events older (each repeat drains into the same deployment as the first)."""
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=10,
        server_settings={"search_path": f'"{schema}"'},
    )
    try:
        await conn.execute(
            "TRUNCATE inbox, subscribers, sync_state, sync_history, sync_traces, sync_writes, "
            "dispatch"
        )
        addresses = [_stored_address(i) for i in range(mix.older)]
        await conn.execute(
            """INSERT INTO subscribers (app_id, channel, address, status, reason, event_id,
                                        event_date, ordered_at)
               SELECT $1, 'email', a, 1, 10, 'stored-' || a, $3, $3
               FROM unnest($2::text[]) AS a""",
            d.APP_ID,
            addresses,
            STORED_DATE,
        )
        await conn.execute("ANALYZE subscribers")
    finally:
        await conn.close()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drain_consumer(settings: Settings, expected: int) -> dict[str, Any]:
    """The real subscription consumer (built as ``consume subscriptions`` builds it, with the
    settings' batch, prefetch and flush) from a full queue until ``expected`` messages have an
    outcome."""
    pool = await create_pool(settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s)
    try:
        connection = await connect(settings, "bench drain")
        async with connection:
            built = consumer_of(subscriptions.PART, settings, connection, pool)
            async with built as consumer, consumer:
                cpu = _cpu_s()
                started = time.perf_counter()
                task = asyncio.create_task(consumer.run())
                counters = consumer.counters
                while counters.applied + sum(counters.skipped.values()) < expected:
                    if task.done() or time.perf_counter() - started > 300:
                        raise RuntimeError(f"drain stopped early: {consumer!r}")
                    await asyncio.sleep(0.002)
                elapsed = time.perf_counter() - started
                cpu = _cpu_s() - cpu
                await consumer.stop()
                await task
                return {
                    "elapsed_s": elapsed,
                    "cpu_s": cpu,
                    "applied": counters.applied,
                    "skipped": dict(counters.skipped),
                    "dead_lettered": counters.dead_lettered,
                }
    finally:
        await pool.close()


async def drain_raw(
    amqp_url: str, queue_name: str, expected: int, prefetch: int, batch: int
) -> dict[str, Any]:
    """aio-pika alone: consume with the consumer's prefetch and ack every ``batch`` messages
    with one ``ack(multiple=True)``, as the consumer acks its batches; nothing else."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name)
        done = asyncio.Event()
        count = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            count += 1
            if count % batch == 0 or count == expected:
                await message.ack(multiple=True)
            if count >= expected:
                done.set()

        cpu = _cpu_s()
        started = time.perf_counter()
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - started
        cpu = _cpu_s() - cpu
        await queue.cancel(tag)
    return {"elapsed_s": elapsed, "cpu_s": cpu}


_NAIVE_INBOX = """
INSERT INTO inbox (app_id, event_id, channel, address, status, reason, event_date,
                   event_date_raw, protocol, received_at, outcome)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'applied')
ON CONFLICT (app_id, event_id) DO NOTHING RETURNING event_id
"""
_NAIVE_UPSERT = """
INSERT INTO subscribers AS s (app_id, channel, address, status, reason, event_id, event_date,
                              ordered_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
ON CONFLICT (app_id, channel, address) DO UPDATE
SET status = excluded.status, reason = excluded.reason, event_id = excluded.event_id,
    event_date = excluded.event_date, ordered_at = excluded.ordered_at, updated_at = now()
WHERE (excluded.ordered_at, excluded.event_id COLLATE "C")
    > (s.ordered_at, s.event_id COLLATE "C")
RETURNING event_id
"""
_NAIVE_OLDER = "UPDATE inbox SET outcome = 'older' WHERE app_id = $1 AND event_id = $2"


async def _naive_apply(conn: asyncpg.Connection, event: SubscriptionStatusChanged) -> str:
    async with conn.transaction():
        if (
            await conn.fetchval(
                _NAIVE_INBOX,
                event.app_id,
                event.event_id,
                event.channel,
                event.address,
                event.status,
                event.reason,
                event.event_date,
                event.event_date_raw,
                event.protocol,
                event.received_at,
            )
            is None
        ):
            return "duplicate"
        if (
            await conn.fetchval(
                _NAIVE_UPSERT,
                event.app_id,
                event.channel,
                event.address,
                event.status,
                event.reason,
                event.event_id,
                event.event_date,
            )
            is None
        ):
            await conn.execute(_NAIVE_OLDER, event.app_id, event.event_id)
            return "older"
    return "applied"


async def drain_naive(
    settings: Settings, schema: str, queue_name: str, expected: int, prefetch: int
) -> dict[str, Any]:
    """One message at a time: decode, one transaction (inbox, ledger), commit, ack."""
    apps = settings.apps
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=10,
        server_settings={"search_path": f'"{schema}"'},
    )
    outcomes: Counter[str] = Counter()
    try:
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(queue_name)
            started = time.perf_counter()
            async with queue.iterator(timeout=30) as messages:
                async for message in messages:
                    try:
                        outcome = await _naive_apply(conn, decode(message.body, apps))
                    except InvalidMessage:
                        outcome = "rejected"
                    await message.ack()
                    outcomes[outcome] += 1
                    if outcomes.total() >= expected:
                        break
            elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return {"elapsed_s": elapsed, "outcomes": dict(outcomes)}


@dataclass
class DrainFigures:
    consumer_rate: list[float] = field(default_factory=list)
    consumer_s: list[float] = field(default_factory=list)
    raw_rate: list[float] = field(default_factory=list)
    naive_rate: list[float] = field(default_factory=list)
    preload_s: list[float] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)


async def _declare_side_queues(settings: Settings, raw: str, naive: str, naive_count: int) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology(settings).webhook_exchange)
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        for name, extra in ((raw, {}), (naive, {"x-max-length": naive_count})):
            queue = await channel.declare_queue(
                name, durable=True, arguments={**arguments, **extra}
            )
            for routing_key in ROUTING_KEY_BY_CHANNEL.values():
                await queue.bind(exchange, routing_key=routing_key)


async def run(*, repeats: int, events: int, naive_events: int, log_dir: Path) -> list[Row]:
    mix = Mix(events)
    settings = d.make_settings("drain")
    names = topology(settings)
    raw_queue, naive_queue = f"{settings.amqp_prefix}.raw", f"{settings.amqp_prefix}.naive"
    naive_schema = f"{settings.database_schema}_naive"
    figures = DrainFigures()
    options = settings.subscriptions
    try:
        async with d.deployment(settings):
            await _declare_side_queues(settings, raw_queue, naive_queue, naive_events)
            conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
            try:
                await migrate(conn, naive_schema)
            finally:
                await conn.close()
            with Worker() as worker:
                for repeat in range(repeats):
                    await reset_database(settings, settings.database_schema, mix)
                    await reset_database(settings, naive_schema, mix)
                    figures.preload_s.append(
                        await worker.run(
                            preload,
                            settings.amqp_url.get_secret_value(),
                            names.webhook_exchange,
                            mix,
                        )
                    )
                    # Alternate which drain goes first: neither always finds a warmer broker.
                    order = ["consumer", "raw"] if repeat % 2 == 0 else ["raw", "consumer"]
                    for which in order:
                        if which == "raw":
                            raw = await worker.run(
                                drain_raw,
                                settings.amqp_url.get_secret_value(),
                                raw_queue,
                                events,
                                options.prefetch,
                                options.batch_size,
                            )
                            figures.raw_rate.append(events / raw["elapsed_s"])
                        else:
                            result = await worker.run(drain_consumer, settings, events)
                            figures.consumer_s.append(result["elapsed_s"])
                            figures.consumer_rate.append(events / result["elapsed_s"])
                            figures.outcomes.append(result)
                    naive = await worker.run(
                        drain_naive,
                        settings,
                        naive_schema,
                        naive_queue,
                        min(naive_events, events),
                        options.prefetch,
                    )
                    figures.naive_rate.append(
                        naive["outcomes"] and sum(naive["outcomes"].values()) / naive["elapsed_s"]
                    )
                    await d.purge(settings, naive_queue, names.subscriptions_queue, raw_queue)
    finally:
        await d.remove(settings, extra_queues=(raw_queue, naive_queue))
        conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{naive_schema}" CASCADE')
        finally:
            await conn.close()
    return rows(figures, mix, naive_events, settings)


def rows(figures: DrainFigures, mix: Mix, naive_events: int, settings: Settings) -> list[Row]:
    options = settings.subscriptions
    last = figures.outcomes[-1] if figures.outcomes else {}
    setup = (
        f"{mix.total:,} events ({mix.fresh:,} new, {mix.older:,} older than the stored state,"
        f" {mix.duplicates:,} duplicates); batch {options.batch_size}, prefetch"
        f" {options.prefetch}, flush {options.flush_interval_ms} ms; outcomes of the last"
        f" repeat: applied {last.get('applied')}, skipped {last.get('skipped')}"
    )
    naive_note = (
        f"the naive consumer ran on {naive_events:,} of the same messages per repeat; its rate is"
        f" extrapolated to {mix.total:,} (drain ≈ {mix.total / _median(figures.naive_rate):,.0f} s)"
        if figures.naive_rate
        else ""
    )
    drain_s = _median(figures.consumer_s)
    return [
        Row(
            "subscriptions: drain rate",
            "ev/s",
            figures.consumer_rate,
            baseline="raw consume+ack",
            baseline_samples=figures.raw_rate,
            target=Target("≥ 0.7 x raw consume", min_ratio=0.7),
            note=f"{setup}; drain time {drain_s:.1f} s (median)",
        ),
        Row(
            "subscriptions vs naive",
            "ev/s",
            figures.consumer_rate,
            baseline="1 tx per message",
            baseline_samples=figures.naive_rate,
            target=Target("≥ 5 x naive", min_ratio=5.0),
            note=naive_note,
        ),
    ]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")
