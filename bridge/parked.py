"""The ages of parked messages (in a dead-letter queue or a retry tier), kept in PostgreSQL by
the bridge itself, so that ``status`` and ``/metrics`` can tell them without touching the
queue: on RabbitMQ 3.10 a quorum queue's management record has no head timestamp, and a peek
(get, then requeue) moves the head to the back and counts as a delivery (docs/operations.md,
"How ages are known").

Soft state, never in a message's way: the runtime records a copy after its confirm, and a
failed write costs only the age. The table is ``parked_messages`` (migration 0007)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog

from bridge.db import DATABASE_ERRORS

log = structlog.get_logger(__name__)

Executor = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True)
class Parked:
    """One copy the bridge parked: its queue, its message id and what its age counts from."""

    queue: str
    message_id: str
    since: datetime


@dataclass(frozen=True)
class QueueAge:
    """What the ledger holds for one queue: the copies it knows of and the oldest one's time."""

    copies: int
    oldest: datetime


_RECORD = """
INSERT INTO {table} AS p (queue, message_id, since, copies)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int[])
ON CONFLICT (queue, message_id) DO UPDATE
SET copies = p.copies + excluded.copies,
    since = least(p.since, excluded.since),
    parked_at = now()
"""

# One statement: the rows a release empties go, the others count down.
_RELEASE = """
WITH gone AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[]) AS g(queue, message_id, copies)
), emptied AS (
    DELETE FROM {table} AS p USING gone
    WHERE p.queue = gone.queue AND p.message_id = gone.message_id AND p.copies <= gone.copies
)
UPDATE {table} AS p SET copies = p.copies - gone.copies
FROM gone
WHERE p.queue = gone.queue AND p.message_id = gone.message_id AND p.copies > gone.copies
"""

_AGES = """
SELECT queue, sum(copies)::bigint AS copies, min(since) AS oldest
FROM {table} WHERE queue = any($1::text[]) GROUP BY queue
"""


class Ledger:
    """The ``parked_messages`` table of one schema, each statement bounded by ``timeout_s``.

    ``schema`` None: the table as the connection's search_path finds it (the processes' pools
    set it); a name, for a connection without one (``status``, ``dlq``)."""

    def __init__(self, db: Executor, *, timeout_s: float, schema: str | None = None) -> None:
        self._db = db
        self._timeout_s = timeout_s
        # The schema name is validated by Settings (a lower-case identifier).
        self._table = f'"{schema}".parked_messages' if schema else "parked_messages"

    async def record(self, parked: Iterable[Parked]) -> None:
        """Add these copies (after their publish was confirmed)."""
        earliest: dict[tuple[str, str], datetime] = {}
        copies: Counter[tuple[str, str]] = Counter()
        for p in parked:
            key = (p.queue, p.message_id)
            copies[key] += 1
            earliest[key] = min(earliest.get(key, p.since), p.since)
        if not copies:
            return
        keys = list(copies)
        await self._db.execute(
            _RECORD.format(table=self._table),
            [q for q, _ in keys],
            [m for _, m in keys],
            [earliest[k] for k in keys],
            [copies[k] for k in keys],
            timeout=self._timeout_s,
        )

    async def release(self, queue: str, message_ids: Sequence[str]) -> None:
        """One copy of each id (an id given twice, two) has left ``queue``."""
        gone = Counter(message_ids)
        if not gone:
            return
        ids = list(gone)
        await self._db.execute(
            _RELEASE.format(table=self._table),
            [queue] * len(ids),
            ids,
            [gone[i] for i in ids],
            timeout=self._timeout_s,
        )

    async def now(self) -> datetime:
        """The database's clock, to take before a queue is found empty (see :meth:`forget`)."""
        query = "SELECT clock_timestamp()"
        when: datetime = await self._db.fetchval(query, timeout=self._timeout_s)
        return when

    async def forget(self, queues: Sequence[str], *, parked_before: datetime) -> None:
        """``queues`` were found empty after ``parked_before`` (from :meth:`now`): whatever was
        parked in them before then has left (a purge in the management UI, a failed release).
        A copy recorded since is kept: its queue was not empty any more."""
        if not queues:
            return
        await self._db.execute(
            f"DELETE FROM {self._table} WHERE queue = any($1::text[]) AND parked_at < $2",
            list(queues),
            parked_before,
            timeout=self._timeout_s,
        )

    async def ages(self, queues: Sequence[str]) -> dict[str, QueueAge]:
        """What is known of each queue that holds parked copies."""
        rows = await self._db.fetch(
            _AGES.format(table=self._table), list(queues), timeout=self._timeout_s
        )
        return {row["queue"]: QueueAge(int(row["copies"]), row["oldest"]) for row in rows}


async def clock(ledger: Ledger | None) -> datetime | None:
    """The ledger's clock (:meth:`Ledger.now`); None without a ledger or an answer (logged)."""
    if ledger is None:
        return None
    try:
        return await ledger.now()
    except DATABASE_ERRORS as exc:
        log.warning("parked_ages_unread", error=repr(exc))
        return None


async def softly(what: str, write: Awaitable[object]) -> bool:
    """Await a ledger write; a database failure is logged, not raised (ages only)."""
    try:
        await write
    except DATABASE_ERRORS as exc:
        log.warning("parked_ages_not_kept", write=what, error=repr(exc))
        return False
    return True
