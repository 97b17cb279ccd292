"""Two-way, end to end: edrone's signed webhook through the real ingress into the ledger, then the
shop's own change through the trace forwarder to fake-edrone; an echo is never sent back."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from bridge.amqp import declare_trace_topology, topology
from bridge.devtools.fake_edrone import FakeEdrone
from bridge.ingress.app import create_app
from bridge.signing import sign
from tests.support.consumers import (
    publish_platform,
    ready_count,
    serving_both,
    shop_event,
    wait_until,
)
from tests.support.vectors import APP_ID, EMAIL, PHONE, SECRET, VECTOR_A, VECTOR_B

PATH = "/update_subscriber_status"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SENTINEL = "sentinel@example.com"


@pytest.fixture
async def fake():
    async with FakeEdrone() as server:
        yield server


@pytest.fixture
async def bridge(make_settings, fake, amqp_connection, db):
    """Settings aimed at the fake, with both consumers serving them (the schema migrated and
    the platform exchange declared first, so the shop can publish at once); stopped after."""
    settings = make_settings(
        trace_url=fake.url,
        traces={"retry_tiers_s": (0.2, 0.5), "flush_interval_ms": 10, "breaker_failures": 1000},
    )
    channel = await amqp_connection.channel()
    async with channel:
        await declare_trace_topology(channel, settings)
    async with serving_both(settings):
        yield settings


@pytest.fixture
async def client(aiohttp_client, bridge):
    return await aiohttp_client(create_app(bridge))


async def webhook(client, db, fields, applied):
    """POST a signed webhook to the ingress; wait until ``applied`` events are in the inbox."""
    response = await client.post(PATH, data=urlencode(fields), headers=FORM)
    assert response.status == 200, await response.text()
    await wait_until(lambda: _inbox_has(db, applied))


async def _inbox_has(db, count):
    return await db.fetchval("SELECT count(*) FROM inbox") >= count


async def shop_publishes(amqp_connection, settings, fake, db, change):
    """The shop publishes ``change``, then a change of another customer (the sentinel). Once
    the forwarder recorded edrone's answer to the sentinel's trace, the batch holding it is
    done, and ``change`` (in it or in an earlier one: one queue, batches in order) is final.
    Returns the traces edrone received for ``change``'s address."""
    sent_before = sum(r.form.get("email") == SENTINEL for r in fake.requests)
    # A status other than the last one sent: the sentinel is never a no-op.
    sentinel = shop_event(SENTINEL, status=(sent_before + 1) % 2)
    await publish_platform(amqp_connection, settings, [change, sentinel])
    await wait_until(lambda: _answered(db, sent_before + 1))
    return [r for r in fake.requests if r.form.get("email") == change["email"]]


async def _answered(db, count):
    sql = (
        "SELECT count(*) FROM sync_history WHERE address = $1 AND kind = 'trace'"
        " AND decision = 'sent'"
    )
    return await db.fetchval(sql, SENTINEL) >= count


async def test_echo_of_a_webhook_is_not_traced_a_new_status_once(
    bridge, client, db, fake, amqp_connection
):
    """edrone unsubscribes a customer (signed webhook → ingress → ledger); the shop mirroring
    that status is not traced back, the shop subscribing them again is traced exactly once."""
    await webhook(client, db, VECTOR_A, applied=1)  # e-mail: unsubscribed, from edrone
    row = await db.fetchrow("SELECT status FROM subscribers WHERE address = $1", EMAIL)
    assert row["status"] == 0

    echoed = await shop_publishes(amqp_connection, bridge, fake, db, shop_event(EMAIL, status=0))
    assert echoed == []

    changed = await shop_publishes(amqp_connection, bridge, fake, db, shop_event(EMAIL, status=1))
    assert [(r.form["app_id"], r.form["subscriber_status"], r.status) for r in changed] == [
        (APP_ID, "1", 200)
    ]
    names = topology(bridge)
    assert await ready_count(amqp_connection, names.dead_letter_queue(names.traces_queue)) == 0
    # The ledger keeps what edrone said; the sync state the winner and what edrone now holds.
    assert await db.fetchval("SELECT status FROM subscribers WHERE address = $1", EMAIL) == 0
    state = await db.fetchrow("SELECT * FROM sync_state WHERE address = $1", EMAIL)
    assert (state["status"], state["side"], state["edrone_status"]) == (1, "shop", 1)


async def test_sms_echo_is_not_traced_a_new_sms_status_once(
    bridge, client, db, fake, amqp_connection
):
    """Both of edrone's changes applied (e-mail unsubscribed, SMS subscribed): the shop
    mirroring both is not traced; the shop changing only the SMS status is traced once."""
    await webhook(client, db, VECTOR_A, applied=1)  # e-mail: unsubscribed
    await webhook(client, db, VECTOR_B, applied=2)  # SMS: subscribed

    mirror = shop_event(EMAIL, status=0, phone=PHONE, sms_subscriber_status=1)
    assert await shop_publishes(amqp_connection, bridge, fake, db, mirror) == []

    sms_off = shop_event(EMAIL, status=0, phone=PHONE, sms_subscriber_status=0)
    [trace] = await shop_publishes(amqp_connection, bridge, fake, db, sms_off)
    assert (trace.form["subscriber_status"], trace.form["sms_subscriber_status"]) == ("0", "0")
    assert trace.form["phone"] == PHONE


async def test_typed_forms_of_one_phone_are_one_address(bridge, client, db, fake, amqp_connection):
    """edrone's webhooks give the phone as +48500100200 and as 48 500 100 200, the shop as
    +48 500 100 200 and 500 100 200 (national, read in the default region PL): one address on
    both paths. One ledger row and one SMS sync state; the shop mirroring edrone's SMS status
    is not traced back, and its new SMS status is traced with the phone in E.164."""
    await webhook(client, db, VECTOR_A, applied=1)  # e-mail: unsubscribed
    await webhook(client, db, VECTOR_B, applied=2)  # SMS: subscribed, +48500100200
    typed = {
        **VECTOR_B,
        "phone": "48 500 100 200",
        "event_id": "evt-typed",
        "event_date": "2024-01-15T10:31:00.000Z",
    }
    await webhook(client, db, {**typed, "signature": sign("NATIVE_5", typed, SECRET, APP_ID)}, 3)
    ledger = await db.fetch("SELECT address, event_id FROM subscribers WHERE channel = 'sms'")
    assert [(r["address"], r["event_id"]) for r in ledger] == [(PHONE, "evt-typed")]

    mirror = shop_event(EMAIL, status=0, phone="+48 500 100 200", sms_subscriber_status=1)
    assert await shop_publishes(amqp_connection, bridge, fake, db, mirror) == []

    sms_off = shop_event(EMAIL, status=0, phone="500 100 200", sms_subscriber_status=0)
    [trace] = await shop_publishes(amqp_connection, bridge, fake, db, sms_off)
    assert (trace.form["phone"], trace.form["sms_subscriber_status"]) == (PHONE, "0")
    states = await db.fetch("SELECT address, status FROM sync_state WHERE channel = 'sms'")
    assert [(r["address"], r["status"]) for r in states] == [(PHONE, 0)]
    lines = await db.fetch("SELECT DISTINCT address FROM sync_history WHERE channel = 'sms'")
    assert [r["address"] for r in lines] == [PHONE]
