"""Deployments that share a broker stay apart: the trace queue of each takes, from the shop's
platform exchange, the shared routing key and one key per app it serves
(``customer.subscription.changed.<app_id>``), so a shop that publishes with its app's key
reaches only the deployment that serves the app, and neither dead-letters the other's events.
And the documented example event runs as written against the quick start's configuration."""

from __future__ import annotations

import json
from pathlib import Path

import aio_pika
import asyncpg

from bridge.amqp import declare_trace_topology, platform_routing_keys
from bridge.app_config import AppConfig
from bridge.db import create_pool
from bridge.migrate import migrate
from tests.support.consumers import TRACE_FAST, depths, forward_burst, shop_event

REPO = Path(__file__).resolve().parents[2]


async def publish(connection, exchange_name: str, routing_key: str, event: dict) -> None:
    channel = await connection.channel(publisher_confirms=True)
    async with channel:
        exchange = await channel.get_exchange(exchange_name)
        await exchange.publish(
            aio_pika.Message(json.dumps(event).encode(), message_id=event["event_id"]),
            routing_key,
            timeout=10,
        )


async def deployment(settings, amqp_connection) -> asyncpg.Pool:
    """A deployment's trace topology and migrated schema; its pool."""
    channel = await amqp_connection.channel()
    async with channel:
        await declare_trace_topology(channel, settings)
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        await migrate(conn, settings.database_schema)
    finally:
        await conn.close()
    return await create_pool(settings, command_timeout_s=30)


async def test_two_deployments_on_one_broker_take_only_their_own(
    make_settings, fake, amqp_connection
):
    shop_a = make_settings(
        trace_url=fake.url, traces=TRACE_FAST, apps={"shop-a": AppConfig(secret="a")}
    )
    shop_b = make_settings(
        trace_url=fake.url,
        traces=TRACE_FAST,
        apps={"shop-b": AppConfig(secret="b")},
        amqp_prefix=f"{shop_a.amqp_prefix}_b",
        database_schema=f"{shop_a.database_schema}_b",
    )
    assert shop_a.platform_exchange == shop_b.platform_exchange  # one shop bus, two bridges
    pools = [await deployment(s, amqp_connection) for s in (shop_a, shop_b)]
    try:
        key = shop_a.platform_routing_key
        for app_id, email in (("shop-a", "a@example.com"), ("shop-b", "b@example.com")):
            event = shop_event(email, app_id=app_id)
            await publish(amqp_connection, shop_a.platform_exchange, f"{key}.{app_id}", event)

        consumers = [
            await forward_burst(amqp_connection, pool, s)
            for pool, s in zip(pools, (shop_a, shop_b), strict=True)
        ]
    finally:
        for pool in pools:
            await pool.close()

    assert [c.counters.dead_lettered for c in consumers] == [0, 0]
    assert [c.counters.sent for c in consumers] == [1, 1]
    assert sorted((r.form["email"], r.form["app_id"]) for r in fake.requests) == [
        ("a@example.com", "shop-a"),
        ("b@example.com", "shop-b"),
    ]
    for settings in (shop_a, shop_b):
        assert sum((await depths(amqp_connection, settings)).values()) == 0


def test_an_app_id_that_is_a_wildcard_gets_no_key_of_its_own(make_settings):
    """``*`` and ``#`` would be wildcards in a topic binding: such an app takes the shared key."""
    settings = make_settings(apps={"shop.x": AppConfig(secret="s"), "ok-1": AppConfig(secret="s")})
    key = settings.platform_routing_key
    assert platform_routing_keys(settings) == [key, f"{key}.ok-1"]


async def test_the_documented_example_event_runs_against_the_quick_start(
    make_settings, fake, amqp_connection
):
    """docs/shop-tables.md's event (the file it shows), published as shown, against the quick
    start's EDRONE_BRIDGE_APPS=myapp:mysecret: traced, not dead-lettered."""
    settings = make_settings(
        trace_url=fake.url, traces=TRACE_FAST, apps={"myapp": AppConfig(secret="mysecret")}
    )
    example = json.loads((REPO / "schemas/examples/customer_subscription_changed.json").read_text())
    shown = (REPO / "docs" / "shop-tables.md").read_text()
    assert json.loads(shown.split("```json\n", 1)[1].split("```", 1)[0]) == example
    pool = await deployment(settings, amqp_connection)
    try:
        key = "customer.subscription.changed"  # as the docs' Python example publishes it
        await publish(amqp_connection, settings.platform_exchange, key, example)
        consumer = await forward_burst(amqp_connection, pool, settings)
    finally:
        await pool.close()
    assert (consumer.counters.sent, consumer.counters.dead_lettered) == (1, 0)
    assert [r.form["email"] for r in fake.requests] == [example["email"]]
