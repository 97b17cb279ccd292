"""The runs of ``backfill`` in ``backfill_runs`` (schemas/migrations/0008_backfill_runs.sql):
started or resumed, checkpointed page by page, finished; and the lock that keeps two backfills
of one app from running at once."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg


class RunRefused(Exception):
    """A run that cannot start: another is running, or the unfinished one's source changed."""


@dataclass
class Counts:
    read: int = 0  # rows read from the source, invalid ones included
    queued: int = 0  # published to the background lane, confirmed
    skipped: int = 0  # the bridge knows the shop holds them: nothing to send
    invalid: int = 0  # no valid shop row: counted and reported, never sent

    def add(self, other: Counts) -> None:
        self.read += other.read
        self.queued += other.queued
        self.skipped += other.skipped
        self.invalid += other.invalid


@dataclass
class Run:
    run_id: str
    app_id: str
    source: str
    position: Any = None
    counts: Counts = field(default_factory=Counts)
    started_at: datetime | None = None
    resumed: bool = False


_UNFINISHED_SQL = """
SELECT * FROM backfill_runs WHERE app_id = $1 AND source = $2 AND finished_at IS NULL
"""
_START_SQL = """
INSERT INTO backfill_runs (run_id, app_id, source, source_version) VALUES ($1, $2, $3, $4)
RETURNING started_at
"""
_RESTARTED_SQL = """
UPDATE backfill_runs SET finished_at = now(), updated_at = now(), outcome = 'restarted'
WHERE run_id = $1
"""
_CHECKPOINT_SQL = """
UPDATE backfill_runs
SET position = $2::jsonb, rows_read = $3, queued = $4, skipped = $5, invalid = $6,
    updated_at = now()
WHERE run_id = $1
"""
_FINISH_SQL = """
UPDATE backfill_runs SET finished_at = now(), updated_at = now(), outcome = 'finished'
WHERE run_id = $1
"""
# Two keys: this command's, and the app's within the bridge's schema (apps of two deployments
# sharing a database are not one app).
_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext('edrone-bridge backfill'), hashtext($1))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext('edrone-bridge backfill'), hashtext($1))"


@asynccontextmanager
async def exclusive(pool: asyncpg.Pool, app_id: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the app's backfill lock for the block (a session lock: a killed
    process lets it go with its connection); :class:`RunRefused` while another holds it."""
    async with pool.acquire() as conn:
        name = f"{await conn.fetchval('SELECT current_schema()')}/{app_id}"
        if not await conn.fetchval(_LOCK_SQL, name):
            raise RunRefused(
                f"another backfill of app {app_id!r} is running: wait for it to end, or stop "
                "it (it resumes where it stopped)"
            )
        try:
            yield conn
        finally:
            await conn.fetchval(_UNLOCK_SQL, name)


async def unfinished(conn: asyncpg.Connection, app_id: str, source: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_UNFINISHED_SQL, app_id, source)


async def start(
    conn: asyncpg.Connection, app_id: str, source: str, version: str, *, restart: bool
) -> Run:
    """The source's unfinished run, resumed where its last checkpoint left it; else (or with
    ``restart``, which gives the unfinished one up) a new run."""
    async with conn.transaction():
        found = await unfinished(conn, app_id, source)
        if found is not None and not restart:
            if found["source_version"] != version:
                raise RunRefused(
                    f"run {found['run_id']} of {source} did not finish, and the file has "
                    "changed since: its position means other rows now (--restart starts anew)"
                )
            return resumed(found)
        if found is not None:
            await conn.execute(_RESTARTED_SQL, found["run_id"])
        run_id = str(uuid.uuid4())
        started_at = await conn.fetchval(_START_SQL, run_id, app_id, source, version)
    return Run(run_id, app_id, source, started_at=started_at)


def resumed(row: asyncpg.Record) -> Run:
    position = json.loads(row["position"]) if row["position"] is not None else None
    counts = Counts(row["rows_read"], row["queued"], row["skipped"], row["invalid"])
    return Run(
        row["run_id"], row["app_id"], row["source"], position, counts, row["started_at"], True
    )


async def checkpoint(conn: asyncpg.Connection, run: Run) -> None:
    """Record the run's position and counts: call only once the rows before the position are
    confirmed by the broker."""
    counts = run.counts
    await conn.execute(
        _CHECKPOINT_SQL,
        run.run_id,
        json.dumps(run.position),
        counts.read,
        counts.queued,
        counts.skipped,
        counts.invalid,
    )


async def finish(conn: asyncpg.Connection, run: Run) -> None:
    await conn.execute(_FINISH_SQL, run.run_id)
