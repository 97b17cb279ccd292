"""The shop's own table as a target: each app's ``[apps.<id>.target]`` checked against the live
catalog at start, and edrone's applied changes written to it inside the ledger's transaction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from bridge.config import AppConfig, ConfigError, ShopValue, StatusValues, TargetMapping
from schemas.fields import ascii_email

log = structlog.get_logger(__name__)

# Outcome of an applied change whose address has no row in the shop's table (and
# create_missing is off): acked, counted, the ledger keeps what edrone said (promise 4).
UNKNOWN_CUSTOMER = "unknown_customer"
# Set transaction-locally by the subscription consumer; the outbox trigger skips changes made
# under it, so edrone's own changes never echo back to edrone (promise 5).
ORIGIN_SETTING = "edrone_bridge.origin"
ORIGIN_EDRONE = "edrone"

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


@dataclass(frozen=True)
class Change:
    """A status to write to an app's shop table; ``key`` names it for the caller and starts
    with the app_id."""

    key: tuple[str, ...]
    channel: str
    address: str
    status: int | None


@dataclass
class Applied:
    """What writing changes did: when each key's row was written (the database's clock, after
    its row lock: later than any change of the row it overwrote), and the keys with no row."""

    written: dict[tuple[str, ...], datetime] = field(default_factory=dict)
    unknown: set[tuple[str, ...]] = field(default_factory=set)


def writable(
    targets: Mapping[str, ShopTarget], app_id: str, channel: str, status: int | None
) -> bool:
    """Whether the app's table takes this channel's status (an UNKNOWN needs its value mapped)."""
    target = targets.get(app_id)
    return (
        target is not None
        and target.status_column(channel) is not None
        and status in target.values[channel]
    )


async def apply_changes(
    conn: asyncpg.Connection, targets: Mapping[str, ShopTarget], changes: Sequence[Change]
) -> Applied:
    """Write ``changes`` to the shops' tables, marked as edrone's (the outbox trigger skips
    them); the rows written, and the keys whose address has no row and was not created."""
    groups: dict[tuple[str, str], list[Change]] = {}
    for change in changes:
        if writable(targets, change.key[0], change.channel, change.status):
            groups.setdefault((change.key[0], change.channel), []).append(change)
    applied = Applied()
    if not groups:
        return applied
    await conn.execute("SELECT set_config($1, $2, true)", ORIGIN_SETTING, ORIGIN_EDRONE)
    for (app_id, channel), group in sorted(groups.items()):
        target = targets[app_id]
        found = await _update(conn, target, channel, group)
        missing = [change for change in group if change.address not in found]
        if missing and channel == "email" and target.mapping.create_missing:
            found.update(await _insert(conn, target, missing))
            missing = []
        applied.unknown.update(change.key for change in missing)
        applied.written.update(
            (change.key, found[change.address]) for change in group if change.address in found
        )
    return applied


def _extra_sets(target: ShopTarget, first_param: int) -> tuple[list[str], list[str], list[Any]]:
    """(columns, expressions, parameters) of set_now and set_values."""
    names: list[str] = []
    exprs: list[str] = []
    params: list[Any] = []
    for name in target.mapping.set_now:
        names.append(target.columns[name].sql)
        exprs.append("now()")
    for name, value in target.mapping.set_values.items():
        column = target.columns[name]
        names.append(column.sql)
        exprs.append(f"${first_param + len(params)}::text::{column.type_sql}")
        params.append(as_text(value))
    return names, exprs, params


async def _update(
    conn: asyncpg.Connection, target: ShopTarget, channel: str, group: Sequence[Change]
) -> dict[str, datetime]:
    status = target.status_column(channel)
    assert status is not None
    match = target.match_column(channel)
    # E-mail addresses are lower-cased in the ledger, their domain in IDNA's Unicode form; the
    # shop may keep them as typed, and with the ASCII (xn--) form of the domain.
    if channel == "email":
        where = f"lower(t.{match.sql}) IN (u.address, u.ascii)"
    else:
        where = f"t.{match.sql} = u.address"
    names, exprs, params = _extra_sets(target, 4)
    sets = [f"{status.sql} = u.value::{status.type_sql}"]
    sets += [f"{name} = {expr}" for name, expr in zip(names, exprs, strict=True)]
    sql = (
        f"UPDATE {target.table_sql} AS t SET {', '.join(sets)} "
        "FROM unnest($1::text[], $2::text[], $3::text[]) AS u(address, value, ascii) "
        f"WHERE {where} RETURNING u.address, clock_timestamp() AS written_at"
    )
    values = target.values[channel]
    alternatives = [ascii_email(c.address) if channel == "email" else c.address for c in group]
    rows = await conn.fetch(
        sql,
        [c.address for c in group],
        [values[c.status] for c in group],
        alternatives,
        *params,
    )
    return {row["address"]: row["written_at"] for row in rows}


async def _insert(
    conn: asyncpg.Connection, target: ShopTarget, group: Sequence[Change]
) -> dict[str, datetime]:
    status = target.status_column("email")
    assert status is not None
    address = target.match_column("email")
    names, exprs, params = _extra_sets(target, 3)
    columns = [address.sql, status.sql, *names]
    selected = ["u.address", f"u.value::{status.type_sql}", *exprs]
    sql = (
        f"INSERT INTO {target.table_sql} ({', '.join(columns)}) "
        f"SELECT {', '.join(selected)} FROM unnest($1::text[], $2::text[]) AS u(address, value) "
        f"RETURNING {address.sql} AS address, clock_timestamp() AS written_at"
    )
    values = target.values["email"]
    rows = await conn.fetch(
        sql, [c.address for c in group], [values[c.status] for c in group], *params
    )
    log.info("shop_rows_created", app_id=target.app_id, count=len(group))
    return {row["address"]: row["written_at"] for row in rows}
