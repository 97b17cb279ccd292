"""``edrone-bridge relay``: the shop's own subscription changes, recorded by the outbox trigger,
published as platform events (confirmed) and marked sent, in order per customer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from pydantic import ValidationError

from bridge.amqp import declare_trace_topology
from bridge.broker import connect
from bridge.config import ConfigError, Settings
from bridge.db import (
    CONTENT,
    DATABASE_ERRORS,
    TRANSIENT,
    UNAVAILABLE,
    classify,
    close_pool,
    create_pool,
)
from bridge.metrics import Metrics, Readiness, exposed
from bridge.migrate import wait_until_migrated
from bridge.publishing import ConfirmedPublisher, PublishFailed
from bridge.relay.triggers import install_triggers, notify_channel
from bridge.shop_table import resolve_targets
from bridge.starting import Stopped
from schemas.fields import DEFAULT_PHONE_REGION, PHONE_REGION_CONTEXT
from schemas.platform_event import CustomerSubscriptionChanged

log = structlog.get_logger(__name__)


# One relay at a time per schema publishes (the others wait their turn): with SKIP LOCKED,
# a second relay could publish an address's later change before the first relay's earlier one.
_TURN_SQL = "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.outbox'))"
_UNSENT_SQL = """
SELECT id, app_id, event_id, email, subscriber_status, sms_tracked, sms_subscriber_status,
       phone, occurred_at
FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1
"""
_MARK_SENT_SQL = """
UPDATE outbox AS o SET sent_at = now(), error = e.error
FROM unnest($1::bigint[], $2::text[]) AS e(id, error)
WHERE o.id = e.id
"""
# The outbox's dead letter: the oldest unsent row, which failed alone, is set aside with its
# error so that the rows behind it go on (docs/design.md promise 7).
_SET_ASIDE_SQL = """
UPDATE outbox SET sent_at = now(), error = $1
WHERE id = (SELECT id FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT 1)
RETURNING id
"""
_MAX_ERROR_CHARS = 1_000


def platform_event(
    row: Mapping[str, Any], phone_region: str = DEFAULT_PHONE_REGION
) -> CustomerSubscriptionChanged:
    """The outbox row as the platform event the trace forwarder reads; SMS fields only where
    the mapping has an SMS column (absent says nothing; null would say unknown), the phone in
    E.164 however the shop's table holds it (read in ``phone_region`` without its country
    code); ValidationError for a row that is no valid event."""
    fields: dict[str, Any] = {
        "event_id": str(row["event_id"]),
        "occurred_at": row["occurred_at"],
        "email": row["email"],
        "subscriber_status": row["subscriber_status"],
        "app_id": row["app_id"],
    }
    if row["sms_tracked"]:
        fields["sms_subscriber_status"] = row["sms_subscriber_status"]
        fields["phone"] = row["phone"]
    return CustomerSubscriptionChanged.model_validate(
        fields, context={PHONE_REGION_CONTEXT: phone_region}
    )


def failure_kind(exc: BaseException) -> str:
    """What a failed batch says (bridge.db's kinds): the broker not confirming is about the
    service; a database error is classified; anything else lies in a row's content."""
    if isinstance(exc, PublishFailed):
        return UNAVAILABLE
    return classify(exc)


@dataclass
class RelayCounters:
    published: int = 0
    coalesced: int = 0  # a later change of the same customer was in the same batch
    invalid: int = 0  # not a valid platform event: marked with its error, never published
    set_aside: int = 0  # failed alone (its batch failed for it): marked with its error
    batches: int = 0
    failures: int = 0


class Relay:
    """Publishes the outbox one batch (one transaction) at a time, in id order."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: ConfirmedPublisher,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._settings = settings
        self._metrics = metrics if metrics is not None else Metrics()
        self.counters = RelayCounters()

    def _count(self, outcome: str, count: int) -> None:
        setattr(self.counters, outcome, getattr(self.counters, outcome) + count)
        if count:
            self._metrics.relay_rows.labels(outcome).inc(count)

    def __repr__(self) -> str:
        return f"<Relay {self.counters}>"

    async def publish_batch(self, limit: int | None = None) -> int:
        """Publish the oldest unsent rows (``limit``, by default the batch size); the number of
        rows handled (0: none, or another relay has the turn). The rows are marked sent only
        once every publish is confirmed."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_TURN_SQL):
                return 0
            rows = await conn.fetch(_UNSENT_SQL, limit or self._settings.relay.batch_size)
            if not rows:
                return 0
            errors = await self._publish(rows)
            await conn.execute(
                _MARK_SENT_SQL, [row["id"] for row in rows], [errors.get(row["id"]) for row in rows]
            )
        self.counters.batches += 1
        return len(rows)

    async def _publish(self, rows: Sequence[asyncpg.Record]) -> dict[int, str]:
        """Publish the newest row of each customer (each row holds the whole mapped state, so
        the older ones say nothing more); the errors of rows that are not valid events."""
        newest: dict[tuple[str, str], CustomerSubscriptionChanged] = {}
        errors: dict[int, str] = {}
        for row in rows:  # in id order: a later row replaces an earlier one
            try:
                event = platform_event(row, self._settings.phone_region)
            except ValidationError as exc:
                error = exc.errors(include_url=False, include_input=False)[0]
                where = ".".join(str(part) for part in error["loc"])
                errors[row["id"]] = f"invalid platform event: {where}: {error['msg']}"
                log.warning("outbox_row_invalid", outbox_id=row["id"], error=errors[row["id"]])
                continue
            # By the address's one form (as the forwarder coalesces), not as the shop typed it.
            newest[(row["app_id"], event.email)] = event
        publishes = [
            self._publisher.publish(
                event.model_dump_json(exclude_unset=True).encode(),
                routing_key=self._settings.platform_routing_key,
                message_id=event.event_id,
            )
            for event in newest.values()
        ]
        # Distinct customers only, so publishing them concurrently keeps the order per customer.
        await asyncio.gather(*publishes)
        self._count("published", len(publishes))
        self._count("invalid", len(errors))
        self._count("coalesced", len(rows) - len(errors) - len(newest))
        return errors

    async def _isolate(self) -> bool:
        """After a batch failed for a reason that may lie in a row: the next rows one by one,
        each in its own transaction; one that fails alone is set aside with its error and the
        rest go on. False if the service failed meanwhile (retry later)."""
        for _ in range(self._settings.relay.batch_size):
            try:
                if not await self.publish_batch(1):
                    return True
                continue
            except Exception as exc:
                if failure_kind(exc) == UNAVAILABLE:
                    return False
                failure = exc
            try:
                await self._set_aside(failure)
            except Exception as exc:  # the database went away meanwhile: retry later
                log.warning("outbox_set_aside_failed", error=repr(exc))
                return False
        return True

    async def _set_aside(self, exc: BaseException) -> None:
        error = f"failed alone: {type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_TURN_SQL):
                return
            outbox_id = await conn.fetchval(_SET_ASIDE_SQL, error)
        self._count("set_aside", 1)
        log.warning("outbox_row_set_aside", outbox_id=outbox_id, error=error)

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish until ``stopping`` is set; wake on NOTIFY, poll as the fallback."""
        wake = asyncio.Event()
        listener: asyncpg.Connection | None = None
        poll_s = self._settings.relay.poll_interval_s
        counted = 0  # failures in a row while the database answered
        try:
            while not stopping.is_set():
                if listener is None or listener.is_closed():
                    listener = await self._listen(wake)
                wake.clear()  # before reading: a NOTIFY from here on wakes the next wait
                try:
                    handled = await self.publish_batch()
                except Exception as exc:
                    kind = failure_kind(exc)
                    self.counters.failures += 1
                    counted += kind == TRANSIENT
                    log.warning("relay_batch_failed", error=repr(exc), kind=kind)
                    # A row's content, or a failure that keeps coming while the database
                    # answers: find the row and set it aside; a service error: wait.
                    if kind == CONTENT or counted >= self._settings.relay.max_batch_failures:
                        counted = 0
                        if await self._isolate():
                            continue
                    await _wait_any(stopping, None, poll_s)
                    continue
                counted = 0
                if handled < self._settings.relay.batch_size:
                    await _wait_any(stopping, wake, poll_s)
        finally:
            if listener is not None:
                await listener.close(timeout=5)

    async def _listen(self, wake: asyncio.Event) -> asyncpg.Connection | None:
        try:
            conn = await asyncpg.connect(
                self._settings.database_url.get_secret_value(),
                timeout=10,
                server_settings={"application_name": "edrone-bridge relay"},
            )
            await conn.add_listener(notify_channel(self._settings), lambda *_: wake.set())
        except DATABASE_ERRORS as exc:
            log.warning(
                "relay_listen_failed",
                error=repr(exc),
                poll_interval_s=self._settings.relay.poll_interval_s,
            )
            return None
        return conn


async def _wait_any(stopping: asyncio.Event, wake: asyncio.Event | None, timeout_s: float) -> None:
    waits = [asyncio.create_task(stopping.wait())]
    if wake is not None:
        waits.append(asyncio.create_task(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def serve(
    settings: Settings, stopping: asyncio.Event, metrics: Metrics | None = None
) -> None:
    """Check the targets, install their triggers, then relay until ``stopping`` is set
    (``edrone-bridge relay``; migrations are the CLI's job: until they are applied it waits,
    not ready). Serves ``/metrics``, ``/healthz`` and ``/readyz`` from its start."""
    metrics = metrics if metrics is not None else Metrics()
    readiness = Readiness()
    try:
        pool = await create_pool(
            settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s, stopping=stopping
        )
    except Stopped:
        log.info("stopped_before_serving", part="relay")
        return
    try:
        async with exposed(settings, metrics, readiness, "relay"):
            readiness.reason = "connecting to RabbitMQ"
            await _relay(settings, stopping, pool, metrics, readiness)
    except Stopped:
        log.info("stopped_before_serving", part="relay")
    finally:
        await close_pool(pool, settings.shutdown_timeout_s)


async def _relay(
    settings: Settings,
    stopping: asyncio.Event,
    pool: asyncpg.Pool,
    metrics: Metrics,
    readiness: Readiness,
) -> None:
    connection = await connect(settings, "relay", stopping=stopping)
    async with connection, connection.channel(publisher_confirms=True) as channel:
        # The trigger's function is a migration's: no trigger before the schema has them all.
        await wait_until_migrated(pool, settings.database_schema, stopping, readiness.waiting)
        readiness.reason = "starting to relay"
        targets = await resolve_targets(pool, settings.apps)
        if not targets:
            raise ConfigError("no app has a target table ([apps.<id>.target]) to relay from")
        async with pool.acquire() as conn:
            await install_triggers(conn, settings, targets)
        # The trace forwarder's queue too, so events wait there even before it first runs.
        await declare_trace_topology(channel, settings)
        exchange = await channel.get_exchange(settings.platform_exchange)
        publisher = ConfirmedPublisher(
            channel, exchange, settings.publish_timeout_s, connection=connection
        )
        readiness.checks.append(
            lambda: None if publisher.ready else "the channel to RabbitMQ is closed"
        )
        readiness.reason = None
        log.info("relay_started", apps=sorted(targets))
        await Relay(pool, publisher, settings, metrics).run(stopping)
