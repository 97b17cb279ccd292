"""Both directions against each other, with both consumers running on the real broker and
database and fake-edrone for edrone's trace API (docs/design.md promise 6): a trace edrone processed
after a newer change of its own is corrected; edrone's changes go out on the shop's bus from
the transactional outbox and their echoes are not sent back; history tells the story."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from bridge.amqp import declare_topology, declare_trace_topology
from bridge.app_config import AppConfig
from bridge.ops.history import read_history, render
from schemas.edrone_change import EVENT_TYPE, EdroneSubscriptionChanged
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.cli import run_cli_async
from tests.support.consumers import (
    make_event,
    publish,
    publish_platform,
    serving_both,
    shop_event,
    wait_until,
)

EMAIL = "ola@example.com"
TRACE_SUBSCRIBED, CUSTOMER_UNSUBSCRIBED = 10, 1


@pytest.fixture
async def both(make_settings, fake, amqp_connection, db, request):
    """Both consumers serving the test's settings, aimed at fake-edrone (``publish_changes``
    when the test parametrizes this fixture with True); stopped after the test."""
    publish_changes = getattr(request, "param", False)
    settings = make_settings(
        trace_url=fake.url,
        apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, publish_changes=publish_changes)},
        traces={"retry_tiers_s": (0.2, 0.5), "flush_interval_ms": 10, "breaker_failures": 1000},
        subscriptions={"flush_interval_ms": 10},
        sync={"dispatch_poll_interval_s": 0.2},
    )
    channel = await amqp_connection.channel()
    async with channel:
        await declare_topology(channel, settings)
        await declare_trace_topology(channel, settings)
    async with serving_both(settings):
        yield settings


def traced(fake, email=EMAIL):
    return [r.form.get("subscriber_status") for r in fake.requests if r.form.get("email") == email]


async def test_trace_processed_after_a_newer_edrone_change_is_corrected(
    both, fake, amqp_connection, db
):
    """The shop subscribes Ola (traced); an agent at edrone unsubscribes her a moment later;
    edrone processes the bridge's trace after that and answers with a TRACE webhook of 1. The
    agent's 0 is the newest change a person made: it wins, and since edrone holds 1 by then,
    a corrective trace of 0 goes to edrone; nothing tells edrone 1 again."""
    now = datetime.now(UTC)
    await publish_platform(
        amqp_connection, both, [shop_event(EMAIL, status=1, at=now - timedelta(seconds=5))]
    )
    await wait_until(lambda: traced(fake) == ["1"])
    agent = make_event(EMAIL, status=0, at=now - timedelta(seconds=2), reason=CUSTOMER_UNSUBSCRIBED)
    late_ack = make_event(EMAIL, status=1, at=now, reason=TRACE_SUBSCRIBED)
    await publish(amqp_connection, both, [agent])
    await wait_until(lambda: _decided(db, agent.event_id))
    await publish(amqp_connection, both, [late_ack])

    await wait_until(lambda: _decided(db, late_ack.event_id))
    await wait_until(lambda: traced(fake)[-1:] == ["0"], 15)

    state = await db.fetchrow("SELECT * FROM sync_state WHERE address = $1", EMAIL)
    assert (state["status"], state["side"], state["event_id"]) == (0, "edrone", agent.event_id)
    decisions = {
        row["event_id"]: row["sync_decision"]
        for row in await db.fetch("SELECT event_id, sync_decision FROM inbox")
    }
    assert decisions == {agent.event_id: "wins", late_ack.event_id: "acknowledged"}
    corrective = await db.fetchval(
        "SELECT count(*) FROM sync_traces WHERE address = $1 AND corrective AND status = 0", EMAIL
    )
    assert corrective >= 1
    await asyncio.sleep(0.5)  # room for a wrong trace of 1
    # Every trace after the first tells 0 (when the late acknowledgement shares a second with
    # the correction's answer, what edrone holds is unsure and 0 is told once more).
    story = render(await read_history(db, TEST_APP_ID, EMAIL))
    assert traced(fake)[0] == "1" and set(traced(fake)[1:]) == {"0"}, story


async def _decided(db, event_id):
    return await db.fetchval("SELECT sync_decision FROM inbox WHERE event_id = $1", event_id)


@pytest.mark.parametrize("both", [True], indirect=True)
async def test_edrones_change_goes_on_the_bus_and_its_echo_is_not_sent_back(
    both, fake, amqp_connection, db
):
    """With publish_changes, edrone's change is published after the commit as an
    edrone.subscription.changed event (the shipped schema's); the shop applying it and
    publishing its change with caused_by is an echo, never traced; a person's change after it
    is traced."""
    channel = await amqp_connection.channel()
    exchange = await channel.get_exchange(both.platform_exchange)
    listener = await channel.declare_queue(exclusive=True)
    await listener.bind(exchange, routing_key=both.changes_routing_key)
    change = make_event(EMAIL, status=0, at=datetime.now(UTC) - timedelta(seconds=1))
    await publish(amqp_connection, both, [change])

    message = await _next(listener)
    event = EdroneSubscriptionChanged.model_validate_json(message.body)
    assert (message.type, event.address, event.subscriber_status) == (EVENT_TYPE, EMAIL, 0)
    assert (event.origin, event.edrone_event_id) == ("edrone", change.event_id)
    await wait_until(lambda: _all_dispatched(db))

    echo = shop_event(EMAIL, status=0, caused_by=event.event_id)
    person = shop_event(EMAIL, status=1, at=timedelta(seconds=1))
    await publish_platform(amqp_connection, both, [echo, person])
    await wait_until(lambda: traced(fake) == ["1"], 15)

    lines = (await read_history(db, TEST_APP_ID, EMAIL)).lines
    decisions = [(line.origin, line.kind, line.decision) for line in lines]
    assert ("shop", "shop_change", "echo") in decisions
    assert decisions.count(("shop", "shop_change", "wins")) == 1
    await channel.close()


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with asyncio.timeout(10), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            return message
    raise AssertionError("no message")


async def _all_dispatched(db):
    return not await db.fetchval("SELECT count(*) FROM dispatch WHERE sent_at IS NULL")


async def test_history_tells_why(both, fake, amqp_connection, db):
    """``history`` lists an address's changes both ways in the order learned, with the
    decision and why, and the state now; ``--json`` gives the same to machines."""
    await publish(
        amqp_connection,
        both,
        [make_event(EMAIL, status=0, at=datetime.now(UTC) - timedelta(minutes=1))],
    )
    await wait_until(lambda: db.fetchval("SELECT count(*) FROM inbox"))
    await publish_platform(amqp_connection, both, [shop_event(EMAIL, status=1)])
    await wait_until(lambda: traced(fake) == ["1"])
    await wait_until(
        lambda: db.fetchval("SELECT count(*) FROM sync_history WHERE decision = 'sent'")
    )

    history = await read_history(db, TEST_APP_ID, " OLA@Example.com ")
    kinds = [(line.origin, line.kind, line.decision) for line in history.lines]
    assert kinds == [
        ("edrone", "webhook", "wins"),
        ("shop", "shop_change", "wins"),
        ("bridge", "trace", "sending"),
        ("bridge", "trace", "sent"),
    ]
    text = render(history)
    assert "edrone holds subscribed; the shop holds subscribed" in text
    code, stdout, stderr = await run_cli_async(
        "history",
        EMAIL,
        "--app",
        TEST_APP_ID,
        "--json",
        EDRONE_BRIDGE_DATABASE_URL=both.database_url.get_secret_value(),
        EDRONE_BRIDGE_DATABASE_SCHEMA=both.database_schema,
        EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:{TEST_SECRET}",
    )
    assert code == 0, stderr
    [document] = json.loads(stdout)
    assert [line["decision"] for line in document["lines"]] == ["wins", "wins", "sending", "sent"]
    assert document["now"][0]["winner_side"] == "shop"
