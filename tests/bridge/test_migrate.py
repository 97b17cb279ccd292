"""Migrations: applied in order inside the bridge's schema, each once and recorded; a re-run is a
no-op and an applied file that changed afterwards is refused."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bridge import migrate as migrate_module
from bridge.config import Settings
from bridge.migrate import Migration, MigrationError, load_migrations, migrate


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database whose schema does not exist yet (dropped afterwards
    by the ``settings`` fixture)."""
    connection = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def tables_in(conn: asyncpg.Connection, schema: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
    )
    return {row["table_name"] for row in rows}


class TestMigrate:
    async def test_fresh_schema_gets_every_migration_in_order(self, conn, settings):
        """A fresh database gets every migration, in number order, inside the configured schema."""
        applied = await migrate(conn, settings.database_schema)
        assert applied == [m.name for m in load_migrations()]
        assert applied == sorted(applied)
        tables = await tables_in(conn, settings.database_schema)
        assert {"subscribers", "inbox", "schema_migrations"} <= tables

    async def test_ledger_has_the_design_columns(self, db, settings):
        """edrone_bridge.subscribers has at least the columns docs/design.md promises."""
        rows = await db.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'subscribers'",
            settings.database_schema,
        )
        columns = {row["column_name"] for row in rows}
        expected = {"app_id", "channel", "address", "status", "reason", "event_id", "event_date"}
        assert expected | {"updated_at"} <= columns

    async def test_each_migration_is_recorded_with_its_checksum(self, conn, settings):
        """Every applied file is recorded with its version, name and content checksum."""
        await migrate(conn, settings.database_schema)
        rows = await conn.fetch(
            f'SELECT version, name, checksum FROM "{settings.database_schema}".schema_migrations '
            "ORDER BY version"
        )
        assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
            (m.version, m.name, m.checksum) for m in load_migrations()
        ]

    async def test_rerun_is_a_no_op(self, conn, settings):
        """Running migrate again applies nothing and keeps the recorded rows."""
        await migrate(conn, settings.database_schema)
        before = await conn.fetch(
            f'SELECT * FROM "{settings.database_schema}".schema_migrations ORDER BY version'
        )
        assert await migrate(conn, settings.database_schema) == []
        after = await conn.fetch(
            f'SELECT * FROM "{settings.database_schema}".schema_migrations ORDER BY version'
        )
        assert before == after

    async def test_edited_migration_is_refused(self, conn, settings, monkeypatch):
        """A migration whose file changed after it was applied stops the run, naming the file."""
        await migrate(conn, settings.database_schema)
        first, *rest = load_migrations()
        edited = Migration(first.version, first.name, first.sql + "\n-- edited\n")
        monkeypatch.setattr(migrate_module, "load_migrations", lambda: [edited, *rest])
        with pytest.raises(MigrationError, match=re.escape(first.name)):
            await migrate(conn, settings.database_schema)

    async def test_failed_migration_leaves_nothing_behind(self, conn, settings, monkeypatch):
        """A failing file is named, and neither it nor the ones before it in the run are kept."""
        good, *_ = load_migrations()
        broken = Migration(good.version + 1, "9999_broken.sql", "CREATE TABLE oops (;")
        monkeypatch.setattr(migrate_module, "load_migrations", lambda: [good, broken])
        with pytest.raises(MigrationError, match=re.escape("9999_broken.sql")):
            await migrate(conn, settings.database_schema)
        assert await tables_in(conn, settings.database_schema) == set()

    async def test_concurrent_runs_apply_each_migration_once(self, settings):
        """Two processes migrating at once (say, two `run` replicas) take turns: one applies,
        the other finds nothing to do."""
        url = settings.database_url.get_secret_value()
        first, second = await asyncio.gather(asyncpg.connect(url), asyncpg.connect(url))
        try:
            results = await asyncio.gather(
                migrate(first, settings.database_schema),
                migrate(second, settings.database_schema),
            )
        finally:
            await asyncio.gather(first.close(), second.close())
        names = [m.name for m in load_migrations()]
        assert sorted(results, key=len) == [[], names]

    async def test_other_schemas_are_untouched(self, conn, settings):
        """Migrating one schema creates nothing in ``public``, so deployments can share a db."""
        before = await tables_in(conn, "public")
        await migrate(conn, settings.database_schema)
        assert await tables_in(conn, "public") == before
