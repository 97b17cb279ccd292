"""The outbox relay on a Magento-like table in the test's database: a shop change made by SQL
becomes a platform event and a trace at fake-edrone; edrone's own changes applied by the bridge
are never recorded, so never echo back."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.amqp import declare_topology, declare_trace_topology, topology
from bridge.app_config import AppConfig
from bridge.db import create_pool
from bridge.devtools.fake_edrone import FakeEdrone
from bridge.publishing import ConfirmedPublisher
from bridge.relay import Relay, install_triggers, serve
from bridge.shop_table import resolve_targets
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.cli import run_cli, run_cli_async
from tests.support.consumers import (
    apply_burst,
    make_event,
    publish,
    serve_traces,
    take_all,
    wait_until,
)
from tests.support.shop_tables import MAGENTO_TARGET, magento

TRACES = {"retry_tiers_s": (0.2,), "flush_interval_ms": 10, "timeout_s": 5.0}
SUBSCRIPTIONS = {"batch_size": 20, "flush_interval_ms": 20, "drain_timeout_s": 5.0}


@pytest.fixture
async def fake():
    async with FakeEdrone() as server:
        yield server


@pytest.fixture
def shop_settings(make_settings, settings, fake):
    """The test's settings (cleaned up through ``settings``) with the Magento-like target, aimed
    at fake-edrone; the relay polls rarely, so only its NOTIFY wake-up makes a test fast."""
    return make_settings(
        apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=MAGENTO_TARGET)},
        trace_url=fake.url,
        traces=TRACES,
        subscriptions=SUBSCRIPTIONS,
        relay={"poll_interval_s": 30.0, "batch_size": 50},
    )


@pytest.fixture
async def pool(db, shop_settings):
    value = await create_pool(
        shop_settings, command_timeout_s=shop_settings.subscriptions.db_batch_timeout_s
    )
    yield value
    await asyncio.wait_for(value.close(), 10)


@pytest.fixture
async def relay(db, pool, shop_settings, amqp_connection):
    """A relay with the Magento-like table's trigger installed, publishing on its own
    confirm channel; the trace forwarder's queue is declared and receives its events."""
    await magento(db)
    targets = await resolve_targets(pool, shop_settings.apps)
    await install_triggers(db, shop_settings, targets)
    channel = await amqp_connection.channel(publisher_confirms=True)
    async with channel:
        await declare_trace_topology(channel, shop_settings)
        exchange = await channel.get_exchange(shop_settings.platform_exchange)
        yield Relay(pool, ConfirmedPublisher(channel, exchange, 5.0), shop_settings)


async def published(amqp_connection, settings):
    messages = await take_all(amqp_connection, topology(settings).traces_queue)
    return [json.loads(message.body) for message in messages]


class TestOutbox:
    async def test_sql_change_is_published_in_order_newest_per_customer(
        self, db, relay, shop_settings, amqp_connection
    ):
        """Each SQL change of a mapped column is recorded; a batch publishes the newest change
        of each customer (statuses mapped back to 1/0, unknown values to null) and marks every
        row sent; the next change goes out in the next batch."""
        for status in (3, 1, 3):
            await db.execute(
                "UPDATE newsletter_subscriber SET subscriber_status = $1 "
                "WHERE subscriber_email = 'jan@example.com'",
                status,
            )
        await db.execute(
            "UPDATE newsletter_subscriber SET subscriber_status = 2 "
            "WHERE subscriber_email = 'anna@example.com'"
        )
        # A change of an unmapped column is no subscription change.
        await db.execute("UPDATE newsletter_subscriber SET store_id = 5")
        assert await db.fetchval("SELECT count(*) FROM outbox") == 4

        assert await relay.publish_batch() == 4

        events = await published(amqp_connection, shop_settings)
        assert [(e["email"], e["subscriber_status"]) for e in events] == [
            ("jan@example.com", 0),
            ("anna@example.com", None),
        ]
        assert all(e["app_id"] == TEST_APP_ID and "sms_subscriber_status" not in e for e in events)
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
        assert (relay.counters.published, relay.counters.coalesced) == (2, 2)

        await db.execute(
            "UPDATE newsletter_subscriber SET subscriber_status = 1 "
            "WHERE subscriber_email = 'jan@example.com'"
        )
        assert await relay.publish_batch() == 1
        events = await published(amqp_connection, shop_settings)
        assert [(e["email"], e["subscriber_status"]) for e in events] == [("jan@example.com", 1)]

    async def test_insert_is_recorded_and_invalid_rows_are_marked_not_published(
        self, db, relay, shop_settings, amqp_connection
    ):
        """A new shop row is a change too; a row that is no valid event (a malformed address)
        is marked sent with its error instead of blocking the outbox or being dropped silently."""
        await db.execute(
            "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
            "VALUES ('new@example.com', 1), ('not-an-address', 1)"
        )

        assert await relay.publish_batch() == 2

        events = await published(amqp_connection, shop_settings)
        assert [(e["email"], e["subscriber_status"]) for e in events] == [("new@example.com", 1)]
        error = await db.fetchval("SELECT error FROM outbox WHERE email = 'not-an-address'")
        assert error.startswith("invalid platform event")
        assert relay.counters.invalid == 1

    async def test_row_that_fails_its_batch_is_set_aside_and_the_rest_flows(
        self, measured, db, relay, shop_settings, amqp_connection
    ):
        """A row no batch can be read with (a date Python cannot hold, year 10000) fails its
        batch: the relay takes the rows one by one, sets the failing one aside with its error
        (the outbox's dead letter) and publishes every other row, before and behind it
        (docs/design.md promise 7)."""
        for n in range(5):
            await db.execute(
                "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
                "VALUES ($1, 1)",
                f"before{n}@example.com",
            )
        await db.execute(
            "INSERT INTO outbox (app_id, email, subscriber_status, occurred_at) "
            "VALUES ($1, 'poison@example.com', 1, '10000-01-01 00:00:00+00')",
            TEST_APP_ID,
        )
        for n in range(15):
            await db.execute(
                "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
                "VALUES ($1, 1)",
                f"after{n}@example.com",
            )

        async def all_handled():
            return await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0

        stopping = asyncio.Event()
        running = asyncio.create_task(relay.run(stopping))
        try:
            await wait_until(all_handled, 15)
        finally:
            stopping.set()
            await asyncio.wait_for(running, 10)

        events = await published(amqp_connection, shop_settings)
        emails = sorted(event["email"] for event in events)
        assert emails == sorted(
            [f"before{n}@example.com" for n in range(5)]
            + [f"after{n}@example.com" for n in range(15)]
        )
        error = await db.fetchval("SELECT error FROM outbox WHERE email = 'poison@example.com'")
        assert error.startswith("failed alone: OverflowError")
        assert (relay.counters.set_aside, relay.counters.published) == (1, 20)
        measured(
            f"[poison] relay: 20 good rows + 1 unreadable -> published 20, set aside 1, "
            f"failed batches {relay.counters.failures}"
        )

    async def test_bridge_update_is_not_recorded(
        self, db, pool, relay, shop_settings, amqp_connection
    ):
        """A change the subscription consumer applies from edrone updates the shop's row but
        leaves no outbox row: edrone's own changes never echo back (promise 5)."""
        channel = await amqp_connection.channel()
        async with channel:
            await declare_topology(channel, shop_settings)
        await publish(amqp_connection, shop_settings, [make_event("jan@example.com", status=0)])
        await apply_burst(amqp_connection, pool, shop_settings)

        assert (
            await db.fetchval(
                "SELECT subscriber_status FROM newsletter_subscriber "
                "WHERE subscriber_email = 'jan@example.com'"
            )
            == 3
        )
        assert await db.fetchval("SELECT count(*) FROM outbox") == 0
        assert await relay.publish_batch() == 0


async def test_shop_change_reaches_fake_edrone_and_bridge_change_does_not(
    db, pool, shop_settings, amqp_connection, fake
):
    """End to end: `relay` installs the trigger and, woken by NOTIFY, publishes a shop's SQL
    change; the trace forwarder sends it to fake-edrone. A change applied from edrone in the
    meantime produces no trace."""
    await magento(db)
    stopping = asyncio.Event()
    relay_task = asyncio.create_task(serve(shop_settings, stopping))
    forwarder = asyncio.create_task(serve_traces(shop_settings, stopping, expose_metrics=False))
    try:
        await wait_until(
            lambda: db.fetchval("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal"), 15
        )
        channel = await amqp_connection.channel()
        async with channel:
            await declare_topology(channel, shop_settings)
        await publish(amqp_connection, shop_settings, [make_event("jan@example.com", status=0)])
        await apply_burst(amqp_connection, pool, shop_settings)

        await db.execute(
            "UPDATE newsletter_subscriber SET subscriber_status = 1 "
            "WHERE subscriber_email = 'anna@example.com'"
        )
        # Well under the 30 s poll: the NOTIFY woke the relay.
        await wait_until(lambda: fake.requests, 10)
        await asyncio.sleep(0.5)  # room for a wrong second trace to arrive
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(relay_task, forwarder), 15)
    forms = [request.form for request in fake.requests]
    assert [(f["email"], f["subscriber_status"]) for f in forms] == [("anna@example.com", "1")]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL") == 1


class TestCommand:
    def test_relay_has_help(self):
        """``relay --help`` works without configuration or services."""
        result = run_cli("relay", "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: edrone-bridge relay")

    @pytest.mark.parametrize("command", [["consume", "subscriptions"], ["relay"]])
    async def test_mismatched_target_stops_the_start_in_one_line(
        self, db, settings, tmp_path, command
    ):
        """A target naming a column the table lacks stops the command before it consumes or
        relays: exit 2 and one line that names the option and the column."""
        await magento(db)
        config = tmp_path / "bridge.toml"
        config.write_text(
            f'[apps.{TEST_APP_ID}]\nsecret = "{TEST_SECRET}"\n'
            f"[apps.{TEST_APP_ID}.target]\n"
            'table = "newsletter_subscriber"\naddress_column = "subscriber_email"\n'
            'email_status_column = "status"\n'
        )
        code, _, stderr = await run_cli_async(
            *command,
            EDRONE_BRIDGE_CONFIG=str(config),
            EDRONE_BRIDGE_DATABASE_URL=settings.database_url.get_secret_value(),
            EDRONE_BRIDGE_DATABASE_SCHEMA=settings.database_schema,
            EDRONE_BRIDGE_AMQP_URL=settings.amqp_url.get_secret_value(),
            EDRONE_BRIDGE_AMQP_PREFIX=settings.amqp_prefix,
            EDRONE_BRIDGE_METRICS_PORT="0",
            EDRONE_BRIDGE_LOG_LEVEL="error",
        )
        assert code == 2
        assert stderr.strip().splitlines() == [
            f"edrone-bridge {command[0]}: apps.{TEST_APP_ID}.target.email_status_column: "
            "column 'status' does not exist in newsletter_subscriber"
        ]


@pytest.mark.parametrize(
    "stored", ["+48500100200", "+48 500 100 200", "48500100200", "500 100 200"]
)
async def test_sms_columns_are_applied_and_relayed(make_settings, db, amqp_connection, stored):
    """With an SMS mapping, edrone's SMS change finds its row by phone, however the shop typed
    it, and sets the SMS flag without echo; a shop change of that flag is relayed with
    sms_subscriber_status and the phone in E.164."""
    await db.execute(
        "CREATE TABLE ps_customer (id_customer serial PRIMARY KEY, email text NOT NULL, "
        "newsletter boolean NOT NULL DEFAULT false, phone_mobile text, sms_optin boolean)"
    )
    await db.execute(
        "INSERT INTO ps_customer (email, phone_mobile) VALUES ('jan@example.com', $1)", stored
    )
    target = {
        "table": "ps_customer",
        "address_column": "email",
        "email_status_column": "newsletter",
        "sms_status_column": "sms_optin",
        "phone_column": "phone_mobile",
        "sms_status_values": {"subscribed": True, "unsubscribed": False},
    }
    settings = make_settings(
        apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=target)},
        subscriptions=SUBSCRIPTIONS,
    )
    pool = await create_pool(settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s)
    try:
        targets = await resolve_targets(pool, settings.apps)
        await install_triggers(db, settings, targets)
        channel = await amqp_connection.channel(publisher_confirms=True)
        async with channel:
            await declare_topology(channel, settings)
            await declare_trace_topology(channel, settings)
            sms = make_event("+48500100200", channel="sms", status=1, reason=5)
            await publish(amqp_connection, settings, [sms])
            await apply_burst(amqp_connection, pool, settings)
            assert await db.fetchval("SELECT sms_optin FROM ps_customer") is True
            assert await db.fetchval("SELECT count(*) FROM outbox") == 0

            await db.execute("UPDATE ps_customer SET sms_optin = false")
            exchange = await channel.get_exchange(settings.platform_exchange)
            relay = Relay(pool, ConfirmedPublisher(channel, exchange, 5.0), settings)
            assert await relay.publish_batch() == 1
        [event] = await published(amqp_connection, settings)
        assert (event["email"], event["subscriber_status"]) == ("jan@example.com", 0)
        assert (event["phone"], event["sms_subscriber_status"]) == ("+48500100200", 0)
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_one_relay_at_a_time(db, relay, pool):
    """While one relay holds the outbox's turn, another publishes nothing (the order per
    address would not survive two at once); it takes over once the turn is free."""
    await db.execute("UPDATE newsletter_subscriber SET subscriber_status = 3")
    async with pool.acquire() as holder, holder.transaction():
        assert await holder.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.outbox'))"
        )
        assert await relay.publish_batch() == 0
    assert await relay.publish_batch() == 2
