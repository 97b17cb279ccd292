"""The simulated shops of the convergence test, in the two modes the bridge supports:

- ``TableShop``: a Magento-like table in the test's database; people change it by SQL, the
  bridge writes edrone's changes into it, and the outbox relay turns the shop's own changes
  into platform events.
- ``BusShop``: a shop whose services listen to events: it applies every
  ``edrone.subscription.changed`` the bridge publishes, and its hook publishes every change of
  its own status (a person's, or one the bridge caused) as a platform event, with the cause's
  id as ``caused_by`` or without it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from tests.support.shop_tables import MAGENTO_TARGET

TABLE = """
CREATE TABLE newsletter_subscriber (
    subscriber_id     serial PRIMARY KEY,
    subscriber_email  varchar(150) NOT NULL,
    subscriber_status integer NOT NULL,
    change_status_at  timestamp
);
CREATE UNIQUE INDEX newsletter_subscriber_email ON newsletter_subscriber (lower(subscriber_email));
"""
# The Magento mapping of the shop-table tests, on this table (with its unique address index).
TARGET = MAGENTO_TARGET
_VALUE = {1: 1, 0: 3}
_STATUS = {1: 1, 3: 0}


class TableShop:
    """People change the shop's own table; what the bridge writes lands there too."""

    def __init__(self, pool: asyncpg.Pool, app_id: str) -> None:
        self.pool = pool
        self.app_id = app_id
        self.counts: Counter[str] = Counter()
        self.log: dict[str, list[str]] = defaultdict(list)

    async def create(self, emails: list[str]) -> None:
        """The table, every customer subscribed; before the relay installs its trigger, so
        these rows are no changes."""
        async with self.pool.acquire() as conn:
            await conn.execute(TABLE)
            await conn.execute(
                "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
                "SELECT unnest($1::text[]), 1",
                emails,
            )

    async def person_sets(self, email: str, status: int) -> datetime | None:
        """A person sets ``status``: when the row changed (the database's clock, the outbox's
        too), or None when it held that status already (the trigger records no change)."""
        row = await self.pool.fetchrow(
            "UPDATE newsletter_subscriber SET subscriber_status = $2 "
            "WHERE subscriber_email = $1 AND subscriber_status <> $2 "
            "RETURNING clock_timestamp() AS at",
            email,
            _VALUE[status],
        )
        if row is None:
            return None
        self.counts["person_changes"] += 1
        self.log[email].append(
            f"{row['at'].isoformat(timespec='milliseconds')} shop: person sets {status}"
        )
        return row["at"]

    async def statuses(self) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT subscriber_email, subscriber_status FROM newsletter_subscriber"
        )
        return {row["subscriber_email"]: _STATUS[row["subscriber_status"]] for row in rows}


class BusShop:
    """A shop that listens: ``caused_by`` tells whether its hook names the bridge's event that
    caused a change."""

    def __init__(
        self,
        app_id: str,
        emails: list[str],
        *,
        caused_by: bool,
        exchange: aio_pika.abc.AbstractExchange,
        routing_key: str,
    ) -> None:
        self.app_id = app_id
        self.caused_by = caused_by
        self.status = dict.fromkeys(emails, 1)
        self.exchange = exchange
        self.routing_key = routing_key
        self.counts: Counter[str] = Counter()
        self.log: dict[str, list[str]] = defaultdict(list)
        self.last_activity = time.monotonic()
        # The bridge's events that changed nothing here (the shop held their status): no echo
        # of theirs ever comes, (published_at, status) per customer.
        self.unechoed: defaultdict[str, list[tuple[datetime, int]]] = defaultdict(list)
        # Those that changed the shop: (published_at, status, applied_at) per customer.
        self.echoed: defaultdict[str, list[tuple[datetime, int, datetime]]] = defaultdict(list)
        # One customer's changes in turn, as one row's would be; customers in parallel.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def person_sets(self, email: str, status: int) -> datetime | None:
        async with self._locks[email]:
            if self.status[email] == status:
                return None
            self.status[email] = status
            now = datetime.now(UTC)
            self.counts["person_changes"] += 1
            self.log[email].append(
                f"{now.isoformat(timespec='milliseconds')} shop: person sets {status}"
            )
            await self._hook(email, status, now, None)
            return now

    async def apply(self, message: AbstractIncomingMessage) -> None:
        """What the shop's service does with the bridge's edrone.subscription.changed."""
        event = json.loads(message.body)
        if event["app_id"] != self.app_id:
            return
        email, status = event["address"], event["subscriber_status"]
        async with self._locks[email]:
            self.counts["bridge_events"] += 1
            self.last_activity = time.monotonic()
            if self.status.get(email) == status:
                self.log[email].append(f"{_now()} shop: the bridge's {status}, no change")
                published = datetime.fromisoformat(event["published_at"])
                self.unechoed[email].append((published, status))
                return
            self.status[email] = status
            now = datetime.now(UTC)
            published = datetime.fromisoformat(event["published_at"])
            self.echoed[email].append((published, status, now))
            self.log[email].append(
                f"{now.isoformat(timespec='milliseconds')} shop: bridge sets {status}"
            )
            self.counts["echoes"] += 1
            await self._hook(email, status, now, event["event_id"] if self.caused_by else None)

    async def _hook(self, email: str, status: int, when: datetime, cause: str | None) -> None:
        event = {
            "event_id": f"shop-{uuid.uuid4()}",
            "occurred_at": when.isoformat(),
            "app_id": self.app_id,
            "email": email,
            "subscriber_status": status,
        }
        if cause is not None:
            event["caused_by"] = cause
        await self.exchange.publish(
            aio_pika.Message(
                json.dumps(event).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event["event_id"],
            ),
            self.routing_key,
            timeout=60,
        )
        self.counts["events_published"] += 1

    async def statuses(self) -> dict[str, int]:
        return dict(self.status)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
