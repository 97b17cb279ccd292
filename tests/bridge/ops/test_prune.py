"""Retention: ``prune`` deletes what is older than its cut-off from the tables that grow with
every event, in batches, and keeps the ledger, the sync state and whatever is unsent or open."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from bridge.cli.processes import with_retention
from bridge.db import create_pool
from bridge.ops.prune import TABLES, prune, prune_once
from tests.support.cli import run_cli

OLD = "now() - interval '40 days'"
NEW = "now() - interval '1 hour'"


async def fill(db) -> None:
    """In each pruned table: old rows that must go, and rows that must stay (new, or old but
    unsent or still open); a ledger row and a sync state row, old."""
    for n, when in enumerate([OLD, OLD, OLD, NEW]):
        await db.execute(
            "INSERT INTO inbox (app_id, event_id, channel, address, status, event_date,"
            " event_date_raw, protocol, received_at, processed_at, outcome)"
            f" VALUES ('a', 'e-{n}', 'email', 'x{n}@example.com', 1, {when}, '', 'NATIVE_5',"
            f" {when}, {when}, 'applied')"
        )
        await db.execute(
            f"INSERT INTO shop_inbox (app_id, event_id, received_at) VALUES ('a', 's-{n}', {when})"
        )
        await db.execute(
            "INSERT INTO sync_history (app_id, channel, address, seq, origin, kind, learned_at,"
            f" decision, why) VALUES ('a', 'email', 'x@example.com', {n}, 'shop', 'shop_change',"
            f" {when}, 'wins', 'test')"
        )
    for sent in [OLD, OLD, NEW, "NULL"]:
        await db.execute(
            f"INSERT INTO outbox (app_id, email, sent_at) VALUES ('a', 'o@example.com', {sent})"
        )
        await db.execute(
            "INSERT INTO dispatch (exchange, routing_key, message_id, type, body, sent_at)"
            f" VALUES ('x', 'k', 'm', 't', '{{}}', {sent})"
        )
    for closed in [OLD, NEW, "NULL"]:
        await db.execute(
            "INSERT INTO sync_traces (app_id, channel, address, status, made_at,"
            " change_event_id, state, sent_at, closed_at) VALUES ('a', 'email', 'x@example.com',"
            f" 1, {OLD}, 'c', 'acknowledged', {OLD}, {closed})"
        )
        await db.execute(
            "INSERT INTO sync_writes (write_id, app_id, channel, address, status,"
            " change_event_id, target, written_at, state, closed_at) VALUES"
            " (gen_random_uuid(), 'a', 'email', 'x@example.com', 1, 'c', 'bus',"
            f" {OLD}, 'echoed', {closed})"
        )
    await db.execute(
        "INSERT INTO subscribers (app_id, channel, address, status, event_id, event_date,"
        f" ordered_at, updated_at) VALUES ('a', 'email', 'x@example.com', 1, 'e-0', {OLD},"
        f" {OLD}, {OLD})"
    )


async def counts(db) -> dict[str, int]:
    tables = [t.name for t in TABLES] + ["subscribers"]
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


class TestPrune:
    async def test_deletes_the_old_and_keeps_the_rest(self, db, settings):
        await fill(db)
        pool = await create_pool(settings, command_timeout_s=30)
        try:
            counted = await prune(pool, timedelta(days=30), dry_run=True)
            assert await counts(db) == {
                "inbox": 4, "shop_inbox": 4, "outbox": 4, "dispatch": 4, "sync_history": 4,
                "sync_traces": 3, "sync_writes": 3, "subscribers": 1,
            }  # fmt: skip
            deleted = await prune(pool, timedelta(days=30), batch_size=2)
        finally:
            await pool.close()
        expected = {
            "inbox": 3, "shop_inbox": 3, "outbox": 2, "dispatch": 2, "sync_history": 3,
            "sync_traces": 1, "sync_writes": 1,
        }  # fmt: skip
        assert counted == expected == deleted
        assert await counts(db) == {
            "inbox": 1, "shop_inbox": 1, "outbox": 2, "dispatch": 2, "sync_history": 1,
            "sync_traces": 2, "sync_writes": 2, "subscribers": 1,
        }  # fmt: skip
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 1

    async def test_less_than_a_day_is_refused(self, db, settings):
        pool = await create_pool(settings, command_timeout_s=30)
        try:
            with pytest.raises(ValueError, match="at least 1 day"):
                await prune(pool, timedelta(hours=12))
        finally:
            await pool.close()


class TestCommand:
    async def test_prints_what_it_deleted(self, db, settings):
        await fill(db)
        result = run_cli(
            "prune",
            "--older-than",
            "30",
            EDRONE_BRIDGE_DATABASE_URL=settings.database_url.get_secret_value(),
            EDRONE_BRIDGE_DATABASE_SCHEMA=settings.database_schema,
            EDRONE_BRIDGE_LOG_LEVEL="warning",
        )
        assert result.returncode == 0, result.stderr
        assert "inbox: deleted 3 rows older than 30 days" in result.stdout
        assert "outbox: deleted 2 rows older than 30 days" in result.stdout

    def test_half_a_day_is_a_usage_error(self):
        result = run_cli("prune", "--older-than", "0.5")
        assert result.returncode == 2
        assert "at least 1 day" in result.stderr


class TestSchedule:
    """EDRONE_BRIDGE_RETENTION_DAYS: the subscription consumer's process prunes on a schedule,
    one process of a schema at a time."""

    async def test_a_served_part_prunes_every_interval_and_stops_with_it(self, db, make_settings):
        """While the part runs, old rows go each interval; a stop ends both at once."""
        settings = make_settings(retention_days=30, retention_interval_s=0.2)
        await fill(db)
        stopping = asyncio.Event()
        ran: list[bool] = []

        async def part(settings, stopping: asyncio.Event) -> None:
            ran.append(True)
            await stopping.wait()

        served = asyncio.create_task(with_retention(part)(settings, stopping))
        try:
            async with asyncio.timeout(10):
                while await db.fetchval("SELECT count(*) FROM inbox") != 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await fill_more(db)  # old again, after the first round: the next round takes it
            async with asyncio.timeout(10):
                while await db.fetchval("SELECT count(*) FROM inbox") != 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            stopping.set()
            async with asyncio.timeout(5):
                await served
        assert ran == [True]
        assert await db.fetchval("SELECT count(*) FROM subscribers") == 1  # never pruned

    async def test_unset_it_prunes_nothing(self, db, make_settings):
        settings = make_settings(retention_interval_s=0.1)
        await fill(db)
        stopping = asyncio.Event()

        async def part(settings, stopping: asyncio.Event) -> None:
            await asyncio.sleep(0.5)

        await with_retention(part)(settings, stopping)
        assert await db.fetchval("SELECT count(*) FROM inbox") == 4

    async def test_a_round_is_skipped_while_another_process_prunes(self, db, settings):
        """The advisory lock held elsewhere (another consumer pruning): this round deletes
        nothing, and the next one, free again, does."""
        await fill(db)
        key = f"edrone-bridge prune {settings.database_schema}"
        assert await db.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
        pool = await create_pool(settings, command_timeout_s=30)
        try:
            await prune_once(pool, timedelta(days=30), settings.database_schema)
            assert await db.fetchval("SELECT count(*) FROM inbox") == 4
            await db.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
            await prune_once(pool, timedelta(days=30), settings.database_schema)
            assert await db.fetchval("SELECT count(*) FROM inbox") == 1
        finally:
            await pool.close()


async def fill_more(db) -> None:
    await db.execute(
        "INSERT INTO inbox (app_id, event_id, channel, address, status, event_date,"
        " event_date_raw, protocol, received_at, processed_at, outcome)"
        f" VALUES ('a', 'e-late', 'email', 'late@example.com', 1, {OLD}, '', 'NATIVE_5',"
        f" {OLD}, {OLD}, 'applied')"
    )
