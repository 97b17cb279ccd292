"""End to end: a signed webhook → 200 → a row in edrone_bridge.subscribers, through the real
ingress, RabbitMQ, the subscription consumer and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest

from bridge.amqp import topology
from bridge.config import Settings
from bridge.ingress.app import create_app
from bridge.ingress.state import METRICS
from bridge.metrics import Metrics
from bridge.signing import sign
from tests.support.consumers import serve_subscriptions
from tests.support.vectors import (
    APP_ID,
    EMAIL,
    PHONE,
    SECRET,
    VECTOR_A,
    VECTOR_B,
    VECTOR_D,
    VECTOR_E,
)

PATH = "/update_subscriber_status"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def consumer(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[None]:
    """The subscription consumer running against the test's queue and (migrated) schema."""
    stopping = asyncio.Event()
    task = asyncio.create_task(serve_subscriptions(settings, stopping))
    yield
    stopping.set()
    async with asyncio.timeout(30):
        await task


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> Any:
    return await aiohttp_client(create_app(settings))


async def wait_for_inbox(db: asyncpg.Connection, count: int, timeout_s: float = 30) -> None:
    """Until ``count`` events are in the inbox; bounded."""
    async with asyncio.timeout(timeout_s):
        while await db.fetchval("SELECT count(*) FROM inbox") < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def subscriber(db: asyncpg.Connection, channel: str, address: str) -> asyncpg.Record:
    return await db.fetchrow(
        "SELECT * FROM subscribers WHERE app_id = $1 AND channel = $2 AND address = $3",
        APP_ID,
        channel,
        address,
    )


def native5(**changes: str) -> dict[str, str]:
    fields = {**VECTOR_A, **changes}
    return {**fields, "signature": sign("NATIVE_5", fields, SECRET, APP_ID)}


async def post(client: Any, fields: dict[str, str]) -> None:
    response = await client.post(PATH, data=urlencode(fields), headers=FORM)
    assert response.status == 200, await response.text()


class TestEndToEnd:
    async def test_native5_email_and_sms_reach_their_own_rows(self, client, consumer, db):
        """NATIVE_5 e-mail and SMS changes land in their own ledger rows, neither touching the
        other's status."""
        await post(client, VECTOR_A)  # e-mail: unsubscribed
        await post(client, VECTOR_B)  # SMS: subscribed
        await wait_for_inbox(db, 2)
        email, sms = await subscriber(db, "email", EMAIL), await subscriber(db, "sms", PHONE)
        assert (email["status"], email["reason"], email["event_id"]) == (0, 1, "evt-123")
        assert (sms["status"], sms["reason"]) == (1, 5)
        assert sms["event_date"] == datetime(2024, 1, 15, 10, 30, 0, 123000, tzinfo=UTC)

    async def test_native4_and_legacy_callbacks(self, client, consumer, db):
        """NATIVE_4 and both legacy callbacks are applied, in the order edrone sent them."""
        native4 = {k: v for k, v in VECTOR_A.items() if k not in ("subscription_status_type_id",)}
        native4 = {**native4, "subscriber_status": "1", "event_date": "2024-01-14 09:00:00"}
        native4["signature"] = sign("NATIVE_4", native4, SECRET, APP_ID)
        await post(client, native4)
        await wait_for_inbox(db, 1)
        assert (await subscriber(db, "email", EMAIL))["status"] == 1

        await post(client, VECTOR_D)  # legacy update, 2024-01-15: subscribed again
        await wait_for_inbox(db, 2)
        assert (await subscriber(db, "email", EMAIL))["event_id"] == "evt-126"

        await post(client, VECTOR_E)  # legacy unsubscribe: happens now
        await wait_for_inbox(db, 3)
        row = await subscriber(db, "email", EMAIL)
        assert row["status"] == 0 and row["event_id"].startswith("legacy-unsubscribe-")

    async def test_replay_is_applied_once(self, client, consumer, db):
        """edrone resending an event_id gets 200 each time; the event is applied once."""
        for _ in range(3):
            await post(client, VECTOR_A)
        await post(client, native5(event_id="evt-after-replays", event_date="2024-01-16 00:00:00"))
        await wait_for_inbox(db, 2)
        assert await db.fetchval("SELECT count(*) FROM inbox WHERE event_id = 'evt-123'") == 1

    async def test_older_event_after_newer_changes_nothing(self, client, consumer, db):
        """A late, older event never overwrites a newer status (docs/design.md promise 3)."""
        await post(
            client, native5(event_id="new", subscriber_status="1", event_date="2024-02-01 00:00:00")
        )
        await wait_for_inbox(db, 1)
        await post(
            client, native5(event_id="old", subscriber_status="0", event_date="2024-01-01 00:00:00")
        )
        await wait_for_inbox(db, 2)
        row = await subscriber(db, "email", EMAIL)
        assert (row["status"], row["event_id"]) == (1, "new")
        assert await db.fetchval("SELECT outcome FROM inbox WHERE event_id = 'old'") == "older"

    @pytest.mark.parametrize("in_flight", [4, 1], ids=["default", "bundled"])
    async def test_shuffled_history_ends_newest_wins(
        self, aiohttp_client, make_settings, consumer, db, in_flight
    ):
        """1,000 events for 50 addresses, sent in shuffled order, 20 at a time, end in the
        newest status of each address; with one broker message in flight, most of them go in
        bundles (several webhooks in one message), and the outcome is the same."""
        app = create_app(make_settings(ingress_publishes_in_flight=in_flight))
        client = await aiohttp_client(app)
        rng = random.Random(7)
        start = datetime(2024, 3, 1, tzinfo=UTC)
        events = []
        for n in range(1000):
            address = f"user{n % 50}@example.com"
            when = start + timedelta(seconds=rng.randrange(10_000_000))
            status = rng.choice(["0", "1"])
            events.append((address, when, f"evt-{n}", status))
        newest = {}
        for address, when, event_id, status in events:
            if address not in newest or (when, event_id) > newest[address][:2]:
                newest[address] = (when, event_id, status)
        rng.shuffle(events)
        semaphore = asyncio.Semaphore(20)

        async def send(address: str, when: datetime, event_id: str, status: str) -> None:
            date = when.strftime("%Y-%m-%d %H:%M:%S")
            async with semaphore:
                await post(
                    client,
                    native5(
                        email=address, event_id=event_id, event_date=date, subscriber_status=status
                    ),
                )

        await asyncio.gather(*(send(*event) for event in events))
        await wait_for_inbox(db, 1000, timeout_s=60)
        registry = app[METRICS].registry
        name = "edrone_bridge_ingress_bundle_webhooks"
        confirmed = registry.get_sample_value(f"{name}_sum") or 0
        alone = registry.get_sample_value(f"{name}_bucket", {"le": "1.0"}) or 0
        assert confirmed == 1000
        if in_flight == 1:
            assert confirmed - alone > 500, (confirmed, alone)  # webhooks that went in bundles
        rows = await db.fetch("SELECT address, event_id, status, event_date FROM subscribers")
        assert len(rows) == 50
        for row in rows:
            when, event_id, status = newest[row["address"]]
            assert (row["event_id"], row["status"], row["event_date"]) == (
                event_id,
                int(status),
                when,
            )


class TestDatesThatCannotBeTrue:
    """docs/design.md promise 6: no date can freeze an address."""

    async def test_after_a_year_9999_webhook_todays_change_applies(
        self, aiohttp_client, make_settings, db
    ):
        """A year-9999 date is stored as stated but ordered as if made at its receipt plus the
        skew (here 1 s): once that has passed, a change dated now applies. The clamp is counted;
        a change within the skew is older, which bounds the hold to the skew."""
        settings = make_settings(max_clock_skew_s=1.0)
        metrics = Metrics()
        client = await aiohttp_client(create_app(settings))
        stopping = asyncio.Event()
        task = asyncio.create_task(serve_subscriptions(settings, stopping, metrics=metrics))
        try:
            await post(
                client,
                native5(event_id="future", subscriber_status="0", event_date="9999-12-31 23:59:59"),
            )
            await wait_for_inbox(db, 1)
            frozen = await subscriber(db, "email", EMAIL)
            assert frozen["event_date"].year == 9999
            received = await db.fetchval("SELECT received_at FROM inbox WHERE event_id = 'future'")
            assert frozen["ordered_at"] == received + timedelta(seconds=1)

            now = datetime.now(UTC)
            early = (now - timedelta(seconds=0.5)).strftime("%Y-%m-%d %H:%M:%S")
            await post(client, native5(event_id="early", subscriber_status="1", event_date=early))
            await wait_for_inbox(db, 2)
            assert await db.fetchval("SELECT outcome FROM inbox WHERE event_id = 'early'") == (
                "older"
            )

            await asyncio.sleep(
                max(0.0, (frozen["ordered_at"] - datetime.now(UTC)).total_seconds())
            )
            today = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
            await post(client, native5(event_id="today", subscriber_status="1", event_date=today))
            await wait_for_inbox(db, 3)
            row = await subscriber(db, "email", EMAIL)
            assert (row["status"], row["event_id"]) == (1, "today")
            labels = {"queue": topology(settings).subscriptions_queue}
            clamped = metrics.registry.get_sample_value("edrone_bridge_dates_clamped_total", labels)
            assert clamped == 1
        finally:
            stopping.set()
            async with asyncio.timeout(30):
                await task
