"""The engine of ``edrone-bridge status``: every queue's depth, consumers and oldest age, the
database and its migrations, and the verdict on what is unhealthy and why."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bridge.amqp import queue_specs
from bridge.config import Settings
from bridge.db import DATABASE_ERRORS
from bridge.migrate import load_migrations
from bridge.ops.queue_status import (
    BrokerStatus,
    Management,
    QueueStatus,
    error_text,
    inspect_broker,
    managements_for,
)
from bridge.parked import Ledger, QueueAge
from bridge.service_urls import amqp_urls, database_address

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_AGE_S = 600.0


@dataclass(frozen=True)
class Limits:
    """What still counts as healthy: dead letters allowed per DLQ, age of the oldest message."""

    max_dlq: int = 0
    max_age_s: float = DEFAULT_MAX_AGE_S


DEFAULT_LIMITS = Limits()


@dataclass
class DatabaseStatus:
    url: str  # without credentials
    schema: str
    reachable: bool = False
    error: str | None = None
    response_ms: float | None = None  # connect plus SELECT 1
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # edited after they were applied
    unknown: list[str] = field(default_factory=list)  # applied by a newer bridge
    # The ages the bridge keeps of parked messages (bridge/parked.py), by queue.
    parked: dict[str, QueueAge] = field(default_factory=dict)
    parked_error: str | None = None  # None once they were read


@dataclass(frozen=True)
class Problem:
    code: str  # stable: broker_unreachable, missing_queue, dead_letters, no_consumer, ...
    subject: str  # a queue name, "broker" or "database"
    reason: str


@dataclass
class Status:
    checked_at: datetime
    prefix: str
    limits: Limits
    broker: BrokerStatus
    queues: list[QueueStatus]
    database: DatabaseStatus
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


# --- the check -------------------------------------------------------------------------------


async def check_status(
    settings: Settings,
    *,
    management: Management | None = None,
    limits: Limits = DEFAULT_LIMITS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Status:
    """Look at the broker and the database side by side (every wait bounded by ``timeout_s``)
    and judge the deployment against ``limits``. Never removes or acks a message."""
    urls = amqp_urls(settings.amqp_url.get_secret_value())
    managements = [management] if management is not None else managements_for(urls)
    specs = queue_specs(settings)
    checked_at = datetime.now(UTC)
    parked = [s.name for s in specs if s.kind != "work"]
    (broker, queues, notes), database = await asyncio.gather(
        inspect_broker(urls, specs, managements, timeout_s),
        inspect_database(settings, timeout_s, parked=parked),
    )
    for queue, spec in zip(queues, specs, strict=True):
        if queue.kind != "dlq":
            queue.age_limit_s = spec.scheduled_s + limits.max_age_s
        if queue.kind != "work" and database.reachable and database.parked_error is None:
            _take_parked_age(queue, database.parked.get(queue.name), checked_at)
    status = Status(checked_at, settings.amqp_prefix, limits, broker, queues, database)
    status.problems = evaluate(status)
    status.notes = notes + _notes(status)
    return status


def _take_parked_age(queue: QueueStatus, age: QueueAge | None, now: datetime) -> None:
    """The ledger's age of a parked queue's oldest message, if it holds any messages now."""
    queue.aged = 0
    if age is None or not queue.messages:
        return
    queue.oldest_age_s = max((now - age.oldest).total_seconds(), 0.0)
    queue.age_since = "dead_lettered" if queue.kind == "dlq" else "first_failure"
    queue.aged = min(age.copies, queue.messages)


def evaluate(status: Status) -> list[Problem]:
    """What is unhealthy, and why, in the order the status shows it."""
    problems: list[Problem] = []
    broker = status.broker
    if not broker.reachable:
        problems.append(
            Problem("broker_unreachable", "broker", f"RabbitMQ at {broker.url}: {broker.error}")
        )
    for queue in status.queues:
        problems += _queue_problems(queue, status.limits, status.prefix)
    return problems + _database_problems(status.database)


def _queue_problems(queue: QueueStatus, limits: Limits, prefix: str) -> list[Problem]:
    found: list[Problem] = []
    short = queue.work_queue.removeprefix(f"{prefix}.")
    if queue.exists is False:
        why = f"does not exist; `edrone-bridge consume {short}` (or `run`) declares it at start"
        return [Problem("missing_queue", queue.name, why)]
    messages = queue.messages or 0
    if queue.kind == "dlq" and messages > limits.max_dlq:
        found.append(
            Problem(
                "dead_letters",
                queue.name,
                f"holds {_plural(messages, 'dead-lettered message')} "
                f"(allowed: {limits.max_dlq}), oldest {_age_text(queue.oldest_age_s)}; "
                f"see `edrone-bridge dlq list {short}`",
            )
        )
    if queue.kind == "work" and (queue.ready or 0) > 0 and queue.consumers == 0:
        found.append(
            Problem(
                "no_consumer",
                queue.name,
                f"{_plural(queue.ready, 'ready message')} and no consumer",
            )
        )
    age, limit = queue.oldest_age_s, queue.age_limit_s
    if age is not None and limit is not None and age > limit:
        found.append(
            Problem(
                "too_old",
                queue.name,
                f"oldest message is {_age_text(age)} old (limit {_age_text(limit)})",
            )
        )
    return found


def _database_problems(database: DatabaseStatus) -> list[Problem]:
    where = f"PostgreSQL at {database.url}"
    if not database.reachable:
        return [Problem("database_unreachable", "database", f"{where}: {database.error}")]
    found = []
    if database.error:  # reachable, but the migrations could not be read
        found.append(Problem("migrations_unknown", "database", f"{where}: {database.error}"))
    if database.pending:
        found.append(
            Problem(
                "migrations_pending",
                "database",
                f"{_plural(len(database.pending), 'migration')} pending in schema "
                f"{database.schema}: {', '.join(database.pending)}; run `edrone-bridge migrate`",
            )
        )
    for name in database.changed:
        found.append(
            Problem("migration_changed", "database", f"{name} was changed after it was applied")
        )
    return found


def _notes(status: Status) -> list[str]:
    notes = []
    if status.broker.management_error is not None and status.broker.reachable:
        notes.append(
            f"management API unavailable ({status.broker.management_error}): ready and consumer "
            "counts come from AMQP, unacked counts are unknown; enable it with `rabbitmq-plugins "
            "enable rabbitmq_management` or give --management-url"
        )
    unsampled = [q.name for q in status.queues if q.exists and q.source == "amqp"]
    if status.broker.management_error is None and unsampled:
        notes.append(
            "the management API has no statistics yet for "
            + ", ".join(unsampled)
            + " (new queues): counted over AMQP, unacked unknown"
        )
    if any(q.kind == "work" and q.messages and q.oldest_age_s is None for q in status.queues):
        notes.append(
            "work queues are never peeked (a read would count toward their delivery limit): "
            "their oldest age is unknown here; each consumer's /metrics has the age of what it "
            "holds"
        )
    for queue in status.queues:
        if queue.offline:
            notes.append(
                f"{queue.name}: {len(queue.offline)} of {len(queue.members or ())} replicas "
                f"offline ({', '.join(queue.offline)}); leader {queue.leader}"
            )
    if status.database.unknown:
        notes.append("migrations applied by a newer bridge: " + ", ".join(status.database.unknown))
    if status.database.parked_error is not None:
        notes.append(
            "the ages of dead-lettered and retried messages could not be read from PostgreSQL "
            f"({status.database.parked_error}); they are kept there, never read off the queues"
        )
    for queue in status.queues:
        unaged = (queue.messages or 0) - (queue.aged or 0)
        if queue.aged is not None and unaged > 0:
            notes.append(
                f"{queue.name}: {_plural(unaged, 'message')} with no age kept by the bridge "
                "(dead-lettered by the broker itself, at its delivery limit, or parked while "
                "PostgreSQL did not answer); queues are never peeked, `edrone-bridge dlq list` "
                "shows each message's age"
            )
    return notes


def _plural(count: int | None, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _age_text(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds:.0f} s"


# --- the database ----------------------------------------------------------------------------


async def inspect_database(
    settings: Settings, timeout_s: float, *, parked: Sequence[str] = ()
) -> DatabaseStatus:
    """Connect and ``SELECT 1``, compare ``schema_migrations`` with the migration files, and
    read the ages kept of the ``parked`` queues' messages."""
    url = settings.database_url.get_secret_value()
    database = DatabaseStatus(_database_shown(url), settings.database_schema)
    started = time.monotonic()
    try:
        conn = await asyncpg.connect(url, timeout=timeout_s)
    except DATABASE_ERRORS as exc:
        database.error = error_text(exc, timeout_s)
        return database
    try:
        await _read_database(conn, database, settings.database_schema, parked, timeout_s, started)
    finally:
        await conn.close(timeout=timeout_s)
    return database


async def _read_database(
    conn: asyncpg.Connection,
    database: DatabaseStatus,
    schema: str,
    parked: Sequence[str],
    timeout_s: float,
    started: float,  # before the connect: the response time counts it
) -> None:
    try:
        await conn.fetchval("SELECT 1", timeout=timeout_s)
        database.response_ms = (time.monotonic() - started) * 1000
        database.reachable = True
        rows = await _applied_migrations(conn, schema, timeout_s)
        _compare_migrations(database, rows)
    except DATABASE_ERRORS as exc:
        database.error = error_text(exc, timeout_s)
        return
    try:
        if parked:
            database.parked = await Ledger(conn, timeout_s=timeout_s, schema=schema).ages(parked)
    except DATABASE_ERRORS as exc:  # not migrated to 0007 yet, say: ages unknown
        database.parked_error = error_text(exc, timeout_s)


async def _applied_migrations(
    conn: asyncpg.Connection, schema: str, timeout_s: float
) -> list[asyncpg.Record]:
    # The schema name is validated by Settings (lower-case identifier), so quoting suffices.
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            f'SELECT version, name, checksum FROM "{schema}".schema_migrations', timeout=timeout_s
        )
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return []  # never migrated: every migration is pending
    return rows


def _compare_migrations(database: DatabaseStatus, rows: Sequence[asyncpg.Record]) -> None:
    done = {row["version"]: row for row in rows}
    known = load_migrations()
    for migration in known:
        row = done.get(migration.version)
        if row is None:
            database.pending.append(migration.name)
        elif row["checksum"] != migration.checksum:
            database.changed.append(migration.name)
        else:
            database.applied.append(migration.name)
    versions = {m.version for m in known}
    database.unknown = [row["name"] for v, row in sorted(done.items()) if v not in versions]


def _database_shown(url: str) -> str:
    return f"postgresql://{database_address(url)}"


# --- JSON ------------------------------------------------------------------------------------


def to_json(status: Status) -> dict[str, Any]:
    """The ``status --json`` document; its keys are a contract for monitoring scripts."""
    broker, database = status.broker, status.database
    return {
        "healthy": status.healthy,
        "checked_at": status.checked_at.isoformat(timespec="seconds"),
        "prefix": status.prefix,
        "limits": {"max_dlq": status.limits.max_dlq, "max_age_s": status.limits.max_age_s},
        "broker": {
            "url": broker.url,
            "nodes": broker.nodes,
            "vhost": broker.vhost,
            "reachable": broker.reachable,
            "error": broker.error,
            "management_url": broker.management_url,
            "management_reachable": broker.management_error is None,
            "management_error": broker.management_error,
        },
        "queues": [_queue_json(queue) for queue in status.queues],
        "database": {
            "url": database.url,
            "schema": database.schema,
            "reachable": database.reachable,
            "error": database.error,
            "response_ms": _rounded(database.response_ms, 1),
            "migrations": {
                "applied": database.applied,
                "pending": database.pending,
                "changed": database.changed,
                "unknown": database.unknown,
            },
        },
        "problems": [
            {"code": p.code, "subject": p.subject, "reason": p.reason} for p in status.problems
        ],
        "notes": status.notes,
    }


def _queue_json(queue: QueueStatus) -> dict[str, Any]:
    return {
        "name": queue.name,
        "kind": queue.kind,
        "work_queue": queue.work_queue,
        "exists": queue.exists,
        "ready": queue.ready,
        "unacked": queue.unacked,
        "consumers": queue.consumers,
        "source": queue.source,
        "oldest_age_s": _rounded(queue.oldest_age_s, 3),
        "age_since": queue.age_since,
        "age_limit_s": queue.age_limit_s,
        "leader": queue.leader,
        "members": queue.members,
        "online": queue.online,
        "aged_messages": queue.aged,
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
