"""The shop's own table, checked: each app's ``[apps.<id>.target]`` resolved against the live
catalog at start, for the consumers that write edrone's changes to it
(``consumers/shop_target.py``) and the relay that installs its trigger."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg
import structlog

from bridge.app_config import AppConfig, ShopValue, StatusValues, TargetMapping
from bridge.config import ConfigError

log = structlog.get_logger(__name__)

_STRING, _DATETIME = "S", "D"  # pg_type.typcategory

_TABLE_SQL = """
SELECT c.oid, n.nspname, c.relname FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')
"""
_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_sql, t.typcategory::text,
       a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AS required
FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
"""


class TargetMismatch(ConfigError):
    """A target mapping that does not fit the live table; the message names the column."""


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (asyncpg has no identifier quoting)."""
    if "\x00" in name:
        raise ValueError("identifier contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


def as_text(value: ShopValue) -> str:
    """A configured value as the text PostgreSQL casts to the column's type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # from format_type(): safe to put in SQL as a cast target
    category: str
    required: bool  # NOT NULL without a default: an INSERT must give it

    @property
    def sql(self) -> str:
        return quote_ident(self.name)


@dataclass(frozen=True)
class ShopTarget:
    """One app's mapping, resolved against the live table."""

    app_id: str
    mapping: TargetMapping
    table_oid: int
    table_sql: str  # schema-qualified and quoted
    columns: Mapping[str, Column]
    # Per channel: edrone's status (1, 0, None) -> the canonical text of the shop's value.
    values: Mapping[str, Mapping[int | None, str]] = field(default_factory=dict)

    def status_column(self, channel: str) -> Column | None:
        name = self.mapping.email_status_column if channel == "email" else None
        if channel == "sms":
            name = self.mapping.sms_status_column
        return self.columns[name] if name is not None else None

    def match_column(self, channel: str) -> Column:
        name = self.mapping.address_column if channel == "email" else self.mapping.phone_column
        assert name is not None
        return self.columns[name]


async def resolve_targets(
    conn: asyncpg.Connection | asyncpg.Pool, apps: Mapping[str, AppConfig]
) -> dict[str, ShopTarget]:
    """Every configured target, checked: :class:`TargetMismatch` names the first bad column."""
    targets = {}
    for app_id, app in apps.items():
        if app.target is not None:
            targets[app_id] = await resolve_target(conn, app_id, app.target)
            log.info("shop_target_checked", app_id=app_id, table=targets[app_id].table_sql)
    return targets


async def resolve_target(
    conn: asyncpg.Connection | asyncpg.Pool, app_id: str, mapping: TargetMapping
) -> ShopTarget:
    where = f"apps.{app_id}.target"
    qualified = ".".join(quote_ident(part) for part in mapping.table.split(".", 1))
    found = await conn.fetchrow(_TABLE_SQL, qualified)
    if found is None:
        raise TargetMismatch(f"{where}.table: no table {mapping.table!r} (search_path applies)")
    table_sql = f"{quote_ident(found['nspname'])}.{quote_ident(found['relname'])}"
    live = {
        row["attname"]: Column(row["attname"], row["type_sql"], row["typcategory"], row["required"])
        for row in await conn.fetch(_COLUMNS_SQL, found["oid"])
    }
    columns: dict[str, Column] = {}
    for option, name in mapping.columns().items():
        if name not in live:
            raise TargetMismatch(
                f"{where}.{option}: column {name!r} does not exist in {mapping.table}"
            )
        columns[name] = live[name]
    _check_categories(where, mapping, columns)
    values: dict[str, dict[int | None, str]] = {}
    for channel, column_name, statuses in (
        ("email", mapping.email_status_column, mapping.email_status_values),
        ("sms", mapping.sms_status_column, mapping.sms_status_values),
    ):
        if column_name is not None:
            option = f"{where}.{channel}_status_values"
            values[channel] = await _status_texts(conn, option, columns[column_name], statuses)
    for name, value in mapping.set_values.items():
        await _canonical(conn, f"{where}.set_values.{name}", columns[name], value)
    if mapping.create_missing:
        given = {mapping.address_column, mapping.email_status_column, *mapping.set_now}
        given.update(mapping.set_values)
        missing = [c.name for c in live.values() if c.required and c.name not in given]
        if missing:
            raise TargetMismatch(
                f"{where}.create_missing: column {missing[0]!r} is NOT NULL without a default; "
                "give it in set_values"
            )
    return ShopTarget(app_id, mapping, found["oid"], table_sql, columns, values)


def _check_categories(where: str, mapping: TargetMapping, columns: Mapping[str, Column]) -> None:
    expected = [(mapping.address_column, "address_column", _STRING, "a text")]
    if mapping.phone_column is not None:
        expected.append((mapping.phone_column, "phone_column", _STRING, "a text"))
    expected += [(name, f"set_now.{name}", _DATETIME, "a date/time") for name in mapping.set_now]
    if mapping.changed_at_column is not None:
        name = mapping.changed_at_column
        expected.append((name, "changed_at_column", _DATETIME, "a date/time"))
    for name, option, category, kind in expected:
        column = columns[name]
        if column.category != category:
            raise TargetMismatch(
                f"{where}.{option}: column {name!r} is {column.type_sql}, not {kind} type"
            )


async def _status_texts(
    conn: asyncpg.Connection | asyncpg.Pool, option: str, column: Column, statuses: StatusValues
) -> dict[int | None, str]:
    texts: dict[int | None, str] = {
        1: await _canonical(conn, f"{option}.subscribed", column, statuses.subscribed),
        0: await _canonical(conn, f"{option}.unsubscribed", column, statuses.unsubscribed),
    }
    if texts[1] == texts[0]:
        raise TargetMismatch(f"{option}: subscribed and unsubscribed are the same value")
    if statuses.unknown is not None:
        texts[None] = await _canonical(conn, f"{option}.unknown", column, statuses.unknown)
    return texts


async def _canonical(
    conn: asyncpg.Connection | asyncpg.Pool, option: str, column: Column, value: ShopValue
) -> str:
    """The value cast to the column's type and back to text (``1`` for a boolean column is
    ``true``), so the trigger compares like with like; a value the type refuses is a mismatch."""
    try:
        text = await conn.fetchval(
            f"SELECT to_jsonb($1::text::{column.type_sql}) #>> '{{}}'", as_text(value)
        )
    except (asyncpg.DataError, asyncpg.PostgresError) as exc:
        raise TargetMismatch(
            f"{option}: {value!r} does not fit column {column.name!r} ({column.type_sql}): "
            f"{exc.__class__.__name__}"
        ) from None
    assert isinstance(text, str)
    return text
