"""``edrone-bridge prune``: retention for the tables that grow with every event, in small
batches of short transactions that lock only the rows they delete (never a table), so the
consumers and the relay go on meanwhile.

What goes, once older than the cut-off: the inbox of edrone's webhooks (with their history
lines) and of the shop's events, the outbox and dispatch rows already sent, the bridge's own
history, and the traces and writes whose matching is closed. What stays, whatever its age: the
ledger, the per-address sync state, anything unsent or still open. A webhook that edrone sends
again after its inbox row is gone is no longer recognised as a duplicate, but it changes
nothing: the stored status is as new or newer (docs/design.md promise 3); edrone retries for
about 36 minutes, far inside any retention this command allows."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import structlog

from bridge.db import DATABASE_ERRORS

log = structlog.get_logger(__name__)

# Anything shorter would forget duplicates edrone may still send.
MIN_AGE = timedelta(days=1)


@dataclass(frozen=True)
class Table:
    """One table and which of its rows may go: ``older`` is a condition on ``$1``, the cut-off."""

    name: str
    older: str


TABLES = (
    Table("inbox", "processed_at < $1"),
    Table("shop_inbox", "received_at < $1"),
    Table("outbox", "sent_at IS NOT NULL AND sent_at < $1"),
    Table("dispatch", "sent_at IS NOT NULL AND sent_at < $1"),
    Table("sync_history", "learned_at < $1"),
    Table("sync_traces", "closed_at IS NOT NULL AND closed_at < $1"),
    Table("sync_writes", "closed_at IS NOT NULL AND closed_at < $1"),
)


async def prune(
    pool: asyncpg.Pool,
    older_than: timedelta,
    *,
    batch_size: int = 5_000,
    pause_s: float = 0.01,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete (or, with ``dry_run``, count) each table's rows older than ``older_than``, at
    most ``batch_size`` per transaction with ``pause_s`` between them; rows per table."""
    if older_than < MIN_AGE:
        raise ValueError(f"keep at least {MIN_AGE.days} day: edrone may still resend")
    cutoff = await pool.fetchval("SELECT now() - $1::interval", older_than)
    done: dict[str, int] = {}
    for table in TABLES:
        if dry_run:
            done[table.name] = await pool.fetchval(
                f"SELECT count(*) FROM {table.name} WHERE {table.older}", cutoff
            )
            continue
        done[table.name] = await _delete(pool, table, cutoff, batch_size, pause_s)
        log.info("table_pruned", table=table.name, rows=done[table.name], before=cutoff.isoformat())
    return done


async def _delete(
    pool: asyncpg.Pool, table: Table, cutoff: object, batch_size: int, pause_s: float
) -> int:
    # By physical row id: one short statement per batch, whatever the table's key.
    statement = (
        f"DELETE FROM {table.name} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {table.name} WHERE {table.older} LIMIT $2))"
    )
    total = 0
    while True:
        result = await pool.execute(statement, cutoff, batch_size)
        deleted = int(result.split()[-1])
        total += deleted
        if deleted < batch_size:
            return total
        await asyncio.sleep(pause_s)  # room for the consumers' own transactions


async def prune_on_schedule(
    pool: asyncpg.Pool,
    older_than: timedelta,
    *,
    interval_s: float,
    stopping: asyncio.Event,
    schema: str,
) -> None:
    """:func:`prune` every ``interval_s`` (the first round after one interval) until
    ``stopping`` is set. Of several processes on one schema, one prunes at a time (an advisory
    lock: the others skip that round); a failed round is logged and tried again next time."""
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_s)
        if stopping.is_set():
            return
        try:
            await prune_once(pool, older_than, schema)
        except DATABASE_ERRORS as exc:
            log.warning("scheduled_prune_failed", error=repr(exc))


async def prune_once(pool: asyncpg.Pool, older_than: timedelta, schema: str) -> None:
    async with pool.acquire() as lock:
        key = f"edrone-bridge prune {schema}"
        if not await lock.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            log.info("scheduled_prune_skipped", reason="another process is pruning")
            return
        try:
            done = await prune(pool, older_than)
            log.info("scheduled_prune_done", rows=sum(done.values()), older_than=str(older_than))
        finally:
            await lock.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
