"""The subscription applier: edrone's status changes into the ``subscribers`` ledger, one
transaction per batch, idempotent on ``event_id`` and newest-wins per subscriber."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractConnection
from pydantic import ValidationError

from bridge.amqp import declare_topology, topology
from bridge.app_config import AppConfig
from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.shop_table import ShopTarget, resolve_targets
from consumers import sync_store
from consumers.convergence import Converger, utcnow, webhook_key
from consumers.dispatch import dispatching
from consumers.outcomes import (
    InvalidMessage,
    Outcome,
    Reject,
    Result,
    RetryLater,
    database_retry,
    describe_validation_error,
)
from consumers.service import ConsumerPart, Lanes
from consumers.spec import Delivery
from consumers.sync import Decision, Verdict
from consumers.sync_store import SyncBatch
from schemas.fields import DATE_FLOOR_CONTEXT, DEFAULT_DATE_FLOOR, ordered_at
from schemas.subscription import SubscriptionStatusChanged

log = structlog.get_logger(__name__)

# Inbox first: ON CONFLICT DO NOTHING RETURNING yields only the events never seen before, each
# with what the sync state made of it (its line of history). Of those, the newest per
# subscriber is upserted into edrone's ledger (ON CONFLICT DO UPDATE may touch a row only once
# per statement) where it is newer than the stored status. Newest by ordered_at: the stated
# event_date, but no later than its receipt plus the clock skew (promise 6); ties fall to the
# greater event_id, compared bytewise so that every replica and test agrees.
_APPLY_SQL = """
WITH incoming AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::smallint[], $6::integer[],
        $7::timestamptz[], $8::text[], $9::text[], $10::timestamptz[], $11::text[],
        $12::timestamptz[], $13::bigint[], $14::text[], $15::text[]
    ) AS t(app_id, event_id, channel, address, status, reason, event_date, event_date_raw,
           protocol, received_at, outcome, ordered_at, sync_seq, sync_decision, sync_why)
), fresh AS (
    INSERT INTO inbox (app_id, event_id, channel, address, status, reason, event_date,
                       event_date_raw, protocol, received_at, outcome, ordered_at, sync_seq,
                       sync_decision, sync_why)
    SELECT app_id, event_id, channel, address, status, reason, event_date, event_date_raw,
           protocol, received_at, outcome, ordered_at, sync_seq, sync_decision, sync_why
    FROM incoming
    ON CONFLICT (app_id, event_id) DO NOTHING
    RETURNING app_id, event_id, channel, address, status, reason, event_date, ordered_at,
              outcome
), candidates AS (
    SELECT DISTINCT ON (app_id, channel, address) *
    FROM fresh
    WHERE outcome = 'applied'
    ORDER BY app_id, channel, address, ordered_at DESC, event_id COLLATE "C" DESC
), upserted AS (
    INSERT INTO subscribers AS s (app_id, channel, address, status, reason, event_id,
                                  event_date, ordered_at)
    SELECT app_id, channel, address, status, reason, event_id, event_date, ordered_at
    FROM candidates
    ORDER BY app_id, channel, address
    ON CONFLICT (app_id, channel, address) DO UPDATE
    SET status = excluded.status, reason = excluded.reason, event_id = excluded.event_id,
        event_date = excluded.event_date, ordered_at = excluded.ordered_at, updated_at = now()
    WHERE (excluded.ordered_at, excluded.event_id COLLATE "C")
        > (s.ordered_at, s.event_id COLLATE "C")
    RETURNING app_id, event_id
)
SELECT f.app_id, f.event_id, f.outcome, f.channel, f.address, f.status,
       u.event_id IS NOT NULL AS upserted
FROM fresh AS f
LEFT JOIN upserted AS u ON u.app_id = f.app_id AND u.event_id = f.event_id
"""

# Read after the sync state's rows are locked, so a replica that handled one of these events a
# moment ago has committed it: a new statement sees it (READ COMMITTED).
_SEEN_SQL = """
SELECT app_id, event_id FROM inbox
WHERE (app_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""

_MARK_OLDER_SQL = """
UPDATE inbox AS i SET outcome = 'older'
FROM unnest($1::text[], $2::text[]) AS o(app_id, event_id)
WHERE i.app_id = o.app_id AND i.event_id = o.event_id
"""


def decode(
    body: bytes, apps: Mapping[str, AppConfig], date_floor: datetime = DEFAULT_DATE_FLOOR
) -> SubscriptionStatusChanged:
    """The message in ``body``, by the same rules the ingress verified it with (so a webhook
    answered 200 is storable); :class:`InvalidMessage` if it can never be applied."""
    try:
        event = SubscriptionStatusChanged.model_validate_json(
            body, context={DATE_FLOOR_CONTEXT: date_floor}
        )
    except ValidationError as exc:
        raise InvalidMessage(f"invalid message: {describe_validation_error(exc)}") from None
    if event.app_id not in apps:
        raise InvalidMessage(f"unknown app_id {event.app_id!r}: not among the configured apps")
    return event


class SubscriptionApplier:
    """The batch handler: decode, drop in-batch duplicates, then in one transaction record the
    inbox and edrone's ledger, read each change into the sync state, and bring the shop (its
    table of ``targets``, its bus) to the winner; edrone too, where it is known to hold another
    status, through a request to the trace forwarder (docs/design.md promise 6).

    ``metrics`` counts the dates ordered earlier than stated; ``nudge`` is called after a
    commit that left messages to publish (the dispatcher's)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        targets: Mapping[str, ShopTarget] | None = None,
        *,
        metrics: Metrics | None = None,
        nudge: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._apps = settings.apps
        self._date_floor = settings.date_floor
        self._clock_skew = settings.clock_skew
        self._converger = Converger(settings, targets or {})
        self._metrics = metrics
        self._nudge = nudge
        self._queue = topology(settings).subscriptions_queue
        self._traces_queue = topology(settings).traces_queue

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Result]:
        outcomes: list[Result] = [Outcome.DUPLICATE] * len(deliveries)
        first: dict[tuple[str, str], int] = {}
        events: list[SubscriptionStatusChanged] = []
        for index, delivery in enumerate(deliveries):
            try:
                event = decode(delivery.body, self._apps, self._date_floor)
            except InvalidMessage as exc:
                outcomes[index] = Reject(exc.reason)
                continue
            key = (event.app_id, event.event_id)
            if key not in first:  # later copies in the same batch stay DUPLICATE
                first[key] = index
                events.append(event)
        if events:
            stored = await self._store(events)
            for key, index in first.items():
                outcomes[index] = stored.get(key, Outcome.DUPLICATE)
        return outcomes

    async def _store(
        self, events: list[SubscriptionStatusChanged]
    ) -> dict[tuple[str, str], Outcome]:
        """Outcome per new ``(app_id, event_id)``; events already in the inbox are left out."""
        when = [ordered_at(e.event_date, e.received_at, self._clock_skew) for e in events]
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                batch, decided = await self._decide(conn, events, when)
                rows = await conn.fetch(_APPLY_SQL, *self._columns(events, when, decided))
                fresh = {(r["app_id"], r["event_id"]) for r in rows}
                if not set(decided) <= fresh:
                    # Another replica stored one of them since we looked: decide again.
                    raise RetryLater("an event was handled concurrently", counts=False)
                older = [
                    row for row in rows if row["outcome"] == Outcome.APPLIED and not row["upserted"]
                ]
                if older:
                    await conn.execute(
                        _MARK_OLDER_SQL,
                        [row["app_id"] for row in older],
                        [row["event_id"] for row in older],
                    )
                unknown = await self._converge(batch, events, decided) if batch else set()
        except RetryLater:
            raise
        except Exception as exc:
            # Only the service's errors retry the batch; any other may lie in one message, and
            # the runtime narrows the batch down to it (promise 7).
            retry = database_retry(exc)
            if retry is None:
                raise
            raise retry from exc
        if batch and batch.dispatch and self._nudge is not None:
            self._nudge()
        self._count_clamped(events, when, fresh)
        return {
            (row["app_id"], row["event_id"]): (
                Outcome.OLDER
                if row["outcome"] == Outcome.APPLIED and not row["upserted"]
                else Outcome.UNKNOWN_CUSTOMER
                if (row["app_id"], row["event_id"]) in unknown
                else Outcome(row["outcome"])
            )
            for row in rows
        }

    async def _decide(
        self,
        conn: asyncpg.Connection,
        events: Sequence[SubscriptionStatusChanged],
        when: Sequence[datetime],
    ) -> tuple[SyncBatch | None, dict[tuple[str, str], tuple[int, Decision]]]:
        """Lock the sync state of the events' addresses and read the new events into it, in
        the order they came: per event, its place in its address's learning order and the
        decision (what the inbox keeps as its line of history)."""
        wanted = [
            (event, at)
            for event, at in zip(events, when, strict=True)
            if self._apps[event.app_id].accepts_status(event.status)
        ]
        if not wanted:
            return None, {}
        batch = await sync_store.lock(conn, (webhook_key(event) for event, _ in wanted))
        seen = await conn.fetch(
            _SEEN_SQL, [e.app_id for e, _ in wanted], [e.event_id for e, _ in wanted]
        )
        known = {(row["app_id"], row["event_id"]) for row in seen}
        decided = {}
        for event, at in wanted:
            if (event.app_id, event.event_id) not in known:
                decision, seq = self._converger.read_webhook(batch, event, at)
                decided[(event.app_id, event.event_id)] = (seq, decision)
        return batch, decided

    async def _converge(
        self,
        batch: SyncBatch,
        events: Sequence[SubscriptionStatusChanged],
        decided: Mapping[tuple[str, str], tuple[int, Decision]],
    ) -> set[tuple[str, str]]:
        """Bring both sides to each address's winner and save the state; the events whose
        address has no row in the shop's table."""
        converger = self._converger
        now = utcnow()
        converger.lapse(batch, now)
        # edrone's change that wins is written even to a shop believed to hold it already: a
        # table the shop's own code keeps may have changed unseen.
        won = {
            webhook_key(event)
            for event in events
            if (found := decided.get((event.app_id, event.event_id))) is not None
            and found[1].decision == Verdict.WINS
        }
        unknown = await converger.bring_shop(batch, batch.states, won, now)
        for key in sorted(batch.states):
            # A trace of the winner on its way settles it (its answer, or its message's retry).
            if converger.edrone_needs_trace(batch, key) and not converger.trace_in_flight(
                batch, key, now
            ):
                converger.request_trace(batch, key, self._traces_queue, now)
        await batch.save()
        last = {
            webhook_key(event): (event.app_id, event.event_id)
            for event in events
            if (event.app_id, event.event_id) in decided
        }
        return {last[key] for key in unknown if key in last}

    def _count_clamped(
        self,
        events: Sequence[SubscriptionStatusChanged],
        when: Sequence[datetime],
        stored: set[tuple[str, str]],
    ) -> None:
        """Log and count the stored events dated later than their receipt plus the clock skew:
        ordered as if made then, so that a wrong clock cannot freeze the address (promise 6)."""
        for event, ordered in zip(events, when, strict=True):
            if ordered == event.event_date or (event.app_id, event.event_id) not in stored:
                continue
            log.warning(
                "event_date_clamped",
                app_id=event.app_id,
                event_id=event.event_id,
                event_date=event.event_date_raw,
                received_at=event.received_at.isoformat(),
                ordered_at=ordered.isoformat(),
            )
            if self._metrics is not None:
                self._metrics.dates_clamped.labels(self._queue).inc()

    def _columns(
        self,
        events: list[SubscriptionStatusChanged],
        when: list[datetime],
        decided: Mapping[tuple[str, str], tuple[int, Decision]],
    ) -> list[list[Any]]:
        # Sorted by subscriber, so competing replicas lock rows in one order (fewer deadlocks).
        pairs = sorted(
            zip(events, when, strict=True),
            key=lambda pair: (pair[0].app_id, pair[0].channel, pair[0].address, pair[0].event_id),
        )
        ordered = [event for event, _ in pairs]
        accepted = [self._apps[e.app_id].accepts_status(e.status) for e in ordered]
        found = [decided.get((e.app_id, e.event_id)) for e in ordered]
        return [
            [e.app_id for e in ordered],
            [e.event_id for e in ordered],
            [e.channel for e in ordered],
            [e.address for e in ordered],
            [e.status for e in ordered],
            [e.reason for e in ordered],
            [e.event_date for e in ordered],
            [e.event_date_raw for e in ordered],
            [e.protocol for e in ordered],
            [e.received_at for e in ordered],
            [Outcome.APPLIED if ok else Outcome.FILTERED for ok in accepted],
            [when for _, when in pairs],
            [f[0] if f else None for f in found],
            [f[1].decision if f else None for f in found],
            [f[1].why if f else None for f in found],
        ]


@asynccontextmanager
async def _applier(
    connection: AbstractConnection,
    pool: asyncpg.Pool,
    settings: Settings,
    metrics: Metrics | None,
) -> AsyncIterator[Lanes]:
    """The applier, with the shops' tables it writes to and the dispatcher it nudges."""
    # Checked before consuming: a mapping that does not fit the table stops the start.
    targets = await resolve_targets(pool, settings.apps)
    async with dispatching(connection, pool, settings) as dispatcher:
        yield Lanes(
            SubscriptionApplier(pool, settings, targets, metrics=metrics, nudge=dispatcher.nudge)
        )


# `edrone-bridge consume subscriptions` (served by consumers.service.serve).
PART = ConsumerPart(
    name="consume subscriptions",
    queue=lambda settings: topology(settings).subscriptions_queue,
    declare=declare_topology,
    handler=_applier,
    options=lambda settings: settings.subscriptions,
    timeout_s=lambda settings: settings.subscriptions.db_batch_timeout_s,
    command_timeout_s=lambda settings: settings.subscriptions.db_batch_timeout_s,
    probe_timeout_s=lambda settings: settings.publish_timeout_s,
)
