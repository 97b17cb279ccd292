"""No message blocks its queue (docs/design.md promise 7), with the real consumers, broker and
database: a message whose content fails its batch is found and dead-lettered alone with the
error, and every good message behind it is delivered, counted."""

from __future__ import annotations

import json
import time

import asyncpg

from bridge.amqp import topology
from bridge.app_config import AppConfig
from bridge.headers import HEADER_ERROR
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import (
    apply_burst,
    depths,
    forward_burst,
    make_event,
    publish,
    publish_platform,
    ready_count,
    shop_event,
    take_all,
)
from tests.support.shop_tables import MAGENTO_TARGET, magento

# The shop's own trigger refuses one address: a data error that PostgreSQL raises for that
# message's content alone (RaiseError, SQLSTATE P0001), however the batch is cut.
REFUSING_TRIGGER = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.subscriber_email LIKE 'poison%' THEN
        RAISE EXCEPTION 'the shop refuses %', NEW.subscriber_email;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON newsletter_subscriber
FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""


class TestSubscriptions:
    async def test_database_error_of_one_message_dead_letters_it_alone(
        self, measured, broker, db, pool, make_consumer_settings
    ):
        """20 good changes and one the shop's table refuses, in one batch: the batch is split
        until the refused one stands alone; it is dead-lettered with PostgreSQL's error and
        leaves no ledger row, and the 20 are applied to the ledger and the shop."""
        await magento(db)
        await db.execute(REFUSING_TRIGGER)
        target = {**MAGENTO_TARGET, "create_missing": True}
        settings = make_consumer_settings(
            batch_size=50, apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=target)}
        )
        names = topology(settings)
        good = [make_event(f"user{n}@example.com") for n in range(20)]
        poison = make_event("poison@example.com")
        await publish(broker, settings, [*good[:12], poison, *good[12:]])

        started = time.monotonic()
        consumer = await apply_burst(broker, pool, settings)
        took_s = time.monotonic() - started

        counters = consumer.counters
        assert (counters.applied, counters.dead_lettered, counters.isolated) == (20, 1, 1)
        assert counters.splits >= 1 and counters.retries == 0
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert json.loads(dead.body)["event_id"] == poison.event_id
        assert "RaiseError: the shop refuses poison@example.com" in dead.headers[HEADER_ERROR]
        ledger = {row["address"] for row in await db.fetch("SELECT address FROM subscribers")}
        assert ledger == {event.address for event in good}
        shop = await db.fetchval(
            "SELECT count(*) FROM newsletter_subscriber WHERE subscriber_email LIKE 'user%'"
        )
        assert shop == 20
        assert await ready_count(broker, names.subscriptions_queue) == 0
        measured(
            f"[poison] subscriptions: 20 good + 1 refused -> applied 20, dead-lettered 1, "
            f"splits {counters.splits}, {took_s:.2f} s"
        )

    async def test_message_stuck_on_a_lock_is_dead_lettered_after_the_bound(
        self, broker, db, pool, make_consumer_settings
    ):
        """A message whose shop row another session holds locked times its batch out: a
        service error, so the batch is retried, but only max_batch_failures times while the
        database answers; then it is narrowed down, the others are applied and it alone is
        dead-lettered."""
        await magento(db)  # jan@example.com is the shop's row for the stuck change
        settings = make_consumer_settings(
            batch_size=50,
            db_batch_timeout_s=0.5,
            max_batch_failures=2,
            apps={
                TEST_APP_ID: AppConfig(
                    secret=TEST_SECRET, target={**MAGENTO_TARGET, "create_missing": True}
                )
            },
        )
        names = topology(settings)
        good = [make_event(f"user{n}@example.com") for n in range(10)]
        stuck = make_event("jan@example.com", status=0)
        locker = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            locking = locker.transaction()
            await locking.start()
            await locker.execute(
                f'SELECT * FROM "{settings.database_schema}".newsletter_subscriber '
                "WHERE subscriber_email = 'jan@example.com' FOR UPDATE"
            )
            await publish(broker, settings, [*good[:4], stuck, *good[4:]])
            consumer = await apply_burst(broker, pool, settings, 60)
            await locking.rollback()
        finally:
            await locker.close()

        counters = consumer.counters
        assert (counters.applied, counters.dead_lettered) == (10, 1)
        assert counters.retries == 1  # the whole batch once more, then halves
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert json.loads(dead.body)["event_id"] == stuck.event_id
        assert dead.headers[HEADER_ERROR].startswith("failed 2 batches, the last alone:")
        ledger = {row["address"] for row in await db.fetch("SELECT address FROM subscribers")}
        assert ledger == {event.address for event in good}


class TestTraces:
    async def test_unstorable_shop_event_does_not_stop_the_trace_path(
        self, fake, make_traces, amqp_connection, pool
    ):
        """A shop event whose e-mail holds a NUL (PostgreSQL cannot store it) is dead-lettered
        at decoding, with the field named; the 20 good events behind it are all sent."""
        settings = await make_traces()
        names = topology(settings)
        good = [shop_event(f"user{n}@example.com") for n in range(20)]
        await publish_platform(amqp_connection, settings, [shop_event("nul\x00@x.com"), *good])

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert (consumer.counters.sent, consumer.counters.dead_lettered) == (20, 1)
        assert sorted(r.form["email"] for r in fake.requests) == sorted(e["email"] for e in good)
        [dead] = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        assert dead.headers[HEADER_ERROR].startswith("invalid platform event: email:")
        assert sum((await depths(amqp_connection, settings)).values()) == 0

    async def test_names_and_tags_postgresql_cannot_store_are_refused(
        self, fake, make_traces, amqp_connection, pool
    ):
        """Every text field is checked at decoding for what PostgreSQL can store: a NUL in a
        name or a tag dead-letters the event naming the field, and nothing is sent for it."""
        settings = await make_traces()
        names = topology(settings)
        bad = [
            shop_event("a@example.com", first_name="Jan\x00"),
            shop_event("b@example.com", customer_tags=["ok", "no\x00"]),
            shop_event("c@example.com", event_id="id\x00"),
        ]
        await publish_platform(amqp_connection, settings, [*bad, shop_event("ok@example.com")])

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert (consumer.counters.sent, consumer.counters.dead_lettered) == (1, 3)
        assert [r.form["email"] for r in fake.requests] == ["ok@example.com"]
        dead = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        errors = sorted(m.headers[HEADER_ERROR] for m in dead)
        assert [e.split(":")[1].strip() for e in errors] == [
            "customer_tags.1",
            "event_id",
            "first_name",
        ]
