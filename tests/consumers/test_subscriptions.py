"""The subscription applier against real RabbitMQ and PostgreSQL: idempotent, newest-wins,
channel-isolated, filtered per app, dead-lettering bad messages, retrying database failures."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import timedelta

import pytest

from bridge.amqp import topology
from bridge.app_config import AppConfig
from bridge.broker import connect
from bridge.headers import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_FIRST_FAILURE,
    HEADER_ORIGINAL_QUEUE,
)
from consumers import subscriptions
from consumers.service import consumer_of
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import (
    BASE_DATE,
    make_event,
    publish,
    ready_count,
    run_burst,
    serve_subscriptions,
    take_all,
    wait_until,
)

SUBSCRIBER_COLUMNS = "app_id, channel, address, status, reason, event_id, event_date"
WAITING_FOR_SUBSCRIBERS_LOCK = (
    "SELECT count(*) FROM pg_locks WHERE relation = 'subscribers'::regclass AND NOT granted"
)


async def subscribers(db):
    rows = await db.fetch(f"SELECT {SUBSCRIBER_COLUMNS} FROM subscribers ORDER BY 1, 2, 3")
    return [tuple(row) for row in rows]


async def inbox_outcomes(db):
    rows = await db.fetch("SELECT event_id, outcome FROM inbox")
    return {row["event_id"]: row["outcome"] for row in rows}


def as_row(event):
    return (
        event.app_id,
        event.channel,
        event.address,
        event.status,
        event.reason,
        event.event_id,
        event.event_date,
    )


class TestApplying:
    async def test_event_is_applied_and_acked(self, broker, db, fast_settings, make_consumer):
        """A status change ends as a ledger row and an inbox row, and leaves the queue."""
        event = make_event(status=0, reason=1)
        await publish(broker, fast_settings, [event])

        consumer = await run_burst(await make_consumer())

        assert await subscribers(db) == [as_row(event)]
        inbox = await db.fetchrow("SELECT * FROM inbox")
        assert (inbox["event_id"], inbox["outcome"], inbox["protocol"]) == (
            event.event_id,
            "applied",
            "NATIVE_5",
        )
        assert inbox["event_date_raw"] == event.event_date_raw
        assert consumer.counters.applied == 1
        assert "applied=1" in repr(consumer)
        # Closing the consumer would have returned an unacked message to the queue.
        assert await ready_count(broker, topology(fast_settings).subscriptions_queue) == 0

    async def test_replayed_event_is_applied_once(self, broker, db, fast_settings, make_consumer):
        """A redelivered or retried event_id is acked and counted, never applied twice."""
        event = make_event()
        await publish(broker, fast_settings, [event, event])
        first = await run_burst(await make_consumer())
        row_before = await db.fetchrow("SELECT updated_at FROM subscribers")

        await publish(broker, fast_settings, [event])
        second = await run_burst(await make_consumer())

        assert (first.counters.applied, first.counters.skipped["duplicate"]) == (1, 1)
        assert (second.counters.applied, second.counters.skipped["duplicate"]) == (0, 1)
        assert await db.fetchval("SELECT count(*) FROM inbox") == 1
        assert await db.fetchrow("SELECT updated_at FROM subscribers") == row_before
        assert await ready_count(broker, topology(fast_settings).subscriptions_queue) == 0

    async def test_older_event_after_newer_changes_nothing(
        self, broker, db, fast_settings, make_consumer
    ):
        """A late event older than the stored status is recorded as older, not applied."""
        newer = make_event(status=0, at=timedelta(minutes=5))
        older = make_event(status=1, at=timedelta(minutes=1))
        await publish(broker, fast_settings, [newer])
        await run_burst(await make_consumer())
        await publish(broker, fast_settings, [older])

        consumer = await run_burst(await make_consumer())

        assert await subscribers(db) == [as_row(newer)]
        assert await inbox_outcomes(db) == {newer.event_id: "applied", older.event_id: "older"}
        assert consumer.counters.skipped["older"] == 1

    async def test_equal_event_dates_are_ordered_by_event_id(
        self, broker, db, fast_settings, make_consumer
    ):
        """Two changes stamped with the same time resolve the same way in any order."""
        low = make_event(status=1, event_id="evt-a")
        high = make_event(status=0, event_id="evt-b")
        await publish(broker, fast_settings, [high])
        await run_burst(await make_consumer())
        await publish(broker, fast_settings, [low])
        await run_burst(await make_consumer())

        assert await subscribers(db) == [as_row(high)]
        assert await inbox_outcomes(db) == {"evt-b": "applied", "evt-a": "older"}

    async def test_shuffled_events_end_in_newest_wins_state(
        self, broker, db, make_consumer_settings, make_consumer
    ):
        """1,000 events for 50 addresses, shuffled and taken by two competing consumers,
        leave exactly the newest status of every address (ties by event_id)."""
        settings = make_consumer_settings(batch_size=50, prefetch=100)
        rng = random.Random(20240115)
        addresses = [f"user{n:02d}@example.com" for n in range(50)]
        events = [
            make_event(
                address,
                status=rng.choice([0, 1, None]),
                reason=rng.randint(1, 15),
                # 20 events an address over 30 instants: equal event_dates do occur.
                at=timedelta(seconds=rng.randrange(30)),
                event_id=f"evt-{rng.getrandbits(64):016x}",
            )
            for address in addresses
            for _ in range(20)
        ]
        rng.shuffle(events)
        await publish(broker, settings, events)

        consumers = [await make_consumer(settings), await make_consumer(settings)]
        async with asyncio.timeout(30):
            await asyncio.gather(*(run_burst(c) for c in consumers))

        newest = {}
        for event in events:
            current = newest.get(event.address)
            if current is None or (event.event_date, event.event_id) > (
                current.event_date,
                current.event_id,
            ):
                newest[event.address] = event
        assert await subscribers(db) == sorted(as_row(e) for e in newest.values())
        outcomes = await inbox_outcomes(db)
        assert len(outcomes) == 1000
        assert all(outcomes[e.event_id] == "applied" for e in newest.values())
        assert all(c.counters.batches for c in consumers)  # both competed for the queue
        applied = sum(c.counters.applied for c in consumers)
        older = sum(c.counters.skipped["older"] for c in consumers)
        assert applied + older == 1000
        assert (applied, older) == (
            sum(o == "applied" for o in outcomes.values()),
            sum(o == "older" for o in outcomes.values()),
        )
        assert await ready_count(broker, topology(settings).subscriptions_queue) == 0

    async def test_sms_and_email_statuses_are_independent(
        self, broker, db, fast_settings, make_consumer
    ):
        """An SMS change never touches the e-mail status of the same customer, nor the reverse."""
        email = make_event("jan.kowalski@example.com", status=1, at=timedelta(minutes=1))
        sms = make_event("+48500100200", channel="sms", status=0, reason=6, at=timedelta(minutes=2))
        later_email = make_event("jan.kowalski@example.com", status=0, at=timedelta(minutes=3))
        await publish(broker, fast_settings, [email, sms])
        await run_burst(await make_consumer())
        await publish(broker, fast_settings, [later_email])
        await run_burst(await make_consumer())

        assert await subscribers(db) == sorted([as_row(later_email), as_row(sms)])

    async def test_sync_filter_records_without_applying(
        self, broker, db, make_consumer_settings, make_consumer
    ):
        """An app synchronising only unsubscribes records a subscribe as filtered, unapplied."""
        settings = make_consumer_settings(
            apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, sync="unsubscribe")}
        )
        subscribe = make_event("a@example.com", status=1)
        unsubscribe = make_event("b@example.com", status=0)
        await publish(broker, settings, [subscribe, unsubscribe])

        consumer = await run_burst(await make_consumer(settings))

        assert await subscribers(db) == [as_row(unsubscribe)]
        assert await inbox_outcomes(db) == {
            subscribe.event_id: "filtered",
            unsubscribe.event_id: "applied",
        }
        assert (consumer.counters.applied, consumer.counters.skipped["filtered"]) == (1, 1)


class TestDeadLettering:
    async def test_bad_messages_go_to_dlq_while_their_batch_applies(
        self, broker, db, make_consumer_settings, make_consumer
    ):
        """Undecodable and schema-breaking messages are dead-lettered with the error, attempts,
        times and queue in their headers; the rest of their batch is applied and acked."""
        settings = make_consumer_settings(flush_interval_ms=300)
        names = topology(settings)
        good = [make_event("a@example.com"), make_event("b@example.com")]
        schema_breaking = json.loads(make_event("c@example.com").model_dump_json())
        schema_breaking["status"] = 7
        bad = [b"{not json", json.dumps(schema_breaking).encode()]
        await publish(broker, settings, [good[0], bad[0], bad[1], good[1]])

        consumer = await run_burst(await make_consumer(settings))

        assert await subscribers(db) == sorted(as_row(e) for e in good)
        assert consumer.counters.batches == 1
        assert (consumer.counters.applied, consumer.counters.dead_lettered) == (2, 2)
        assert await ready_count(broker, names.subscriptions_queue) == 0
        dead = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert sorted(m.body for m in dead) == sorted(bad)
        errors = {m.body: m.headers[HEADER_ERROR] for m in dead}
        assert "invalid message" in errors[bad[0]]
        assert "status" in errors[bad[1]]
        for message in dead:
            assert message.headers[HEADER_ATTEMPTS] == 1
            assert message.headers[HEADER_ORIGINAL_QUEUE] == names.subscriptions_queue
            assert message.headers[HEADER_FIRST_FAILURE] == message.headers[HEADER_DEAD_LETTERED_AT]

    async def test_unknown_app_is_dead_lettered(self, broker, db, fast_settings, make_consumer):
        """A change for an app that is not configured goes to the DLQ naming the app."""
        names = topology(fast_settings)
        await publish(broker, fast_settings, [make_event(app_id="some-other-shop")])

        consumer = await run_burst(await make_consumer())

        assert consumer.counters.dead_lettered == 1
        assert await subscribers(db) == []
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert "unknown app_id 'some-other-shop'" in dead.headers[HEADER_ERROR]

    @pytest.mark.parametrize(
        ("field", "value", "error"),
        [("address", "nul\x00@example.com", "U+0000"), ("reason", 2**40, "reason")],
    )
    async def test_unstorable_message_is_dead_lettered_not_retried(
        self, broker, db, fast_settings, make_consumer, field, value, error
    ):
        """A schema-valid message PostgreSQL could never store is dead-lettered at once
        instead of failing its batch forever."""
        names = topology(fast_settings)
        poison = json.loads(make_event().model_dump_json()) | {field: value}
        await publish(broker, fast_settings, [json.dumps(poison).encode(), make_event("x@y.pl")])

        consumer = await run_burst(await make_consumer())

        assert (consumer.counters.applied, consumer.counters.retries) == (1, 0)
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert error in dead.headers[HEADER_ERROR]


class TestDatabaseFailures:
    async def test_database_error_retries_the_batch_without_loss(
        self, broker, db, fast_settings, make_consumer
    ):
        """While the ledger is unusable the batch is retried in memory after a backoff; once
        it is back, every message is applied exactly once, none redelivered."""
        events = [make_event(f"user{n}@example.com") for n in range(30)]
        await db.execute("ALTER TABLE subscribers RENAME TO subscribers_away")
        await publish(broker, fast_settings, events)

        async with asyncio.timeout(20), await make_consumer() as consumer:
            run = asyncio.create_task(consumer.run())
            await wait_until(lambda: consumer.counters.retries >= 3)
            assert consumer.counters.applied == 0
            assert await db.fetchval("SELECT count(*) FROM inbox") == 0
            await db.execute("ALTER TABLE subscribers_away RENAME TO subscribers")
            await wait_until(lambda: consumer.counters.applied == 30)
            await consumer.stop()
            await run

        assert await subscribers(db) == sorted(as_row(e) for e in events)
        assert await db.fetchval("SELECT count(*) FROM inbox") == 30
        assert consumer.counters.skipped["duplicate"] == 0
        assert await ready_count(broker, topology(fast_settings).subscriptions_queue) == 0

    async def test_batch_is_not_acked_before_commit(
        self, broker, db, make_consumer_settings, make_consumer
    ):
        """A consumer stopped while its transaction keeps failing has acked nothing: every
        message is back in the queue and a later consumer applies all of them."""
        settings = make_consumer_settings(drain_timeout_s=0.3)
        queue = topology(settings).subscriptions_queue
        events = [make_event(f"user{n}@example.com") for n in range(25)]
        await db.execute("ALTER TABLE subscribers RENAME TO subscribers_away")
        await publish(broker, settings, events)

        async with asyncio.timeout(20), await make_consumer(settings) as failing:
            run = asyncio.create_task(failing.run())
            await wait_until(lambda: failing.counters.retries >= 2)
            assert await ready_count(broker, queue) == 0  # all delivered, none acked
            await failing.stop()
            await run
        await wait_until(lambda: ready_count(broker, queue), 5)
        assert await ready_count(broker, queue) == 25

        await db.execute("ALTER TABLE subscribers_away RENAME TO subscribers")
        consumer = await run_burst(await make_consumer(settings))
        assert consumer.counters.applied == 25
        assert await subscribers(db) == sorted(as_row(e) for e in events)

    async def test_stop_lets_the_in_flight_batch_commit_and_ack(
        self, broker, db, fast_settings, make_consumer
    ):
        """stop() during a batch blocked in the database waits for it to commit and ack."""
        queue = topology(fast_settings).subscriptions_queue
        events = [make_event(f"user{n}@example.com") for n in range(10)]
        await publish(broker, fast_settings, events)

        async with asyncio.timeout(20), await make_consumer() as consumer:
            async with db.transaction():
                await db.execute("LOCK TABLE subscribers IN ACCESS EXCLUSIVE MODE")
                run = asyncio.create_task(consumer.run())
                await wait_until(lambda: db.fetchval(WAITING_FOR_SUBSCRIBERS_LOCK))
                stop = asyncio.create_task(consumer.stop())
                await asyncio.sleep(0.2)
                assert not stop.done()
            await stop
            assert run.done()

        assert consumer.counters.applied == 10
        assert await subscribers(db) == sorted(as_row(e) for e in events)
        assert await ready_count(broker, queue) == 0


async def test_lost_channel_batch_is_redelivered_and_deduplicated(broker, db, pool, fast_settings):
    """A channel lost while its batch commits cannot ack it: the batch is dropped from
    memory, the broker redelivers it on the restored channel, and the inbox absorbs it."""
    events = [make_event(f"user{n}@example.com") for n in range(10)]
    await publish(broker, fast_settings, events)
    connection = await connect(fast_settings, "test")  # robust: restores channel and consumer
    async with (
        asyncio.timeout(20),
        connection,
        consumer_of(subscriptions.PART, fast_settings, connection, pool) as consumer,
        consumer,
    ):
        async with db.transaction():
            await db.execute("LOCK TABLE subscribers IN ACCESS EXCLUSIVE MODE")
            run = asyncio.create_task(consumer.run())
            await wait_until(lambda: db.fetchval(WAITING_FOR_SUBSCRIBERS_LOCK))
            # A protocol error (an unknown delivery tag) makes the broker close the channel.
            channel = await consumer._channel.get_underlay_channel()
            await channel.basic_ack(10_000)
            await wait_until(lambda: channel.is_closed)
        await wait_until(lambda: consumer.counters.skipped["duplicate"] == 10)
        await consumer.stop()
        await run

    assert (consumer.counters.applied, consumer.counters.dropped) == (10, 10)
    assert await subscribers(db) == sorted(as_row(e) for e in events)
    assert await ready_count(broker, topology(fast_settings).subscriptions_queue) == 0


async def test_serve_applies_until_stopped(broker, db, fast_settings):
    """serve() consumes with its own pool and connection and returns promptly once stopped."""
    event = make_event(status=0, at=BASE_DATE)
    stopping = asyncio.Event()
    task = asyncio.create_task(serve_subscriptions(fast_settings, stopping))
    try:
        await publish(broker, fast_settings, [event])
        await wait_until(lambda: db.fetchval("SELECT count(*) FROM subscribers"))
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
    assert await subscribers(db) == [as_row(event)]
