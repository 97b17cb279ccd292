"""Applies ``schemas/migrations/NNNN_name.sql`` in order, each once, recorded in the schema."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg
import structlog

from bridge.starting import unless_stopped

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant shared by every bridge process: concurrent `migrate` runs take turns.
_ADVISORY_LOCK = 0x6564726F6E65  # "edrone"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    """An applied migration's file was changed afterwards, or a migration failed."""


def load_migrations() -> list[Migration]:
    folder = resources.files("schemas") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number: {versions}")
    return found


async def migrate(conn: asyncpg.Connection, schema: str) -> list[str]:
    """Apply the pending migrations inside ``schema``; return the names applied."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_LOCK)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            row["version"]: row
            for row in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        }
        for migration in load_migrations():
            row = done.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            # A savepoint per file, so the error names the file that failed.
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{migration.name} failed: {exc}") from exc
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.name)
            log.info("migration_applied", migration=migration.name, schema=schema)
    return applied_now


async def pending(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> list[str]:
    """The migrations not applied in ``schema`` (all of them before the first)."""
    table = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".schema_migrations')
    if table is None:
        return [m.name for m in load_migrations()]
    rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
    applied = {row["version"] for row in rows}
    return [m.name for m in load_migrations() if m.version not in applied]


async def wait_until_migrated(
    pool: asyncpg.Pool,
    schema: str,
    stopping: asyncio.Event,
    waiting: Callable[[str | None], None],
    *,
    interval_s: float = 2.0,
) -> None:
    """Return once ``schema`` has every migration; until then tell ``waiting`` why the process
    is not ready (None once it is), look again every ``interval_s``, and raise ``Stopped`` if
    a stop is asked for meanwhile: a process never works on tables it does not know."""
    logged = False
    while missing := await pending(pool, schema):
        reason = (
            f"schema {schema} lacks {len(missing)} of {len(load_migrations())} migrations "
            f"(first: {missing[0]}): run edrone-bridge migrate"
        )
        waiting(reason)
        if not logged:
            log.warning("schema_not_migrated", schema=schema, missing=missing, hint=reason)
            logged = True
        await unless_stopped(asyncio.sleep(interval_s), stopping)
    waiting(None)
