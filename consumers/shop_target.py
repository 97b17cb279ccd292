"""The shop's own table as a target: edrone's applied changes written to it inside the
ledger's transaction (the table itself is checked at start by ``bridge/shop_table.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from bridge.shop_table import ShopTarget, as_text
from schemas.fields import DEFAULT_PHONE_REGION, ascii_email, phone_forms

log = structlog.get_logger(__name__)

# Set transaction-locally by the subscription consumer; the outbox trigger skips changes made
# under it, so edrone's own changes never echo back to edrone (promise 5).
ORIGIN_SETTING = "edrone_bridge.origin"
ORIGIN_EDRONE = "edrone"


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
    conn: asyncpg.Connection,
    targets: Mapping[str, ShopTarget],
    changes: Sequence[Change],
    phone_region: str = DEFAULT_PHONE_REGION,
) -> Applied:
    """Write ``changes`` to the shops' tables, marked as edrone's (the outbox trigger skips
    them); the rows written, and the keys whose address has no row and was not created. A
    phone (E.164) finds its row in any of its usual spellings, national ones read in
    ``phone_region``."""
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
        found = await _update(conn, target, channel, group, phone_region)
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
    conn: asyncpg.Connection,
    target: ShopTarget,
    channel: str,
    group: Sequence[Change],
    phone_region: str,
) -> dict[str, datetime]:
    status = target.status_column(channel)
    assert status is not None
    match = target.match_column(channel)
    column = f"lower(t.{match.sql})" if channel == "email" else f"t.{match.sql}"
    forms = [(c, form) for c in group for form in _forms(channel, c.address, phone_region)]
    names, exprs, params = _extra_sets(target, 4)
    sets = [f"{status.sql} = u.value::{status.type_sql}"]
    sets += [f"{name} = {expr}" for name, expr in zip(names, exprs, strict=True)]
    sql = (
        f"UPDATE {target.table_sql} AS t SET {', '.join(sets)} "
        "FROM unnest($1::text[], $2::text[], $3::text[]) AS u(address, value, form) "
        f"WHERE {column} = u.form RETURNING u.address, clock_timestamp() AS written_at"
    )
    values = target.values[channel]
    rows = await conn.fetch(
        sql,
        [c.address for c, _ in forms],
        [values[c.status] for c, _ in forms],
        [form for _, form in forms],
        *params,
    )
    return {row["address"]: row["written_at"] for row in rows}


def _forms(channel: str, address: str, phone_region: str) -> list[str]:
    """The forms of a ledger address the shop's table may hold it in. E-mail addresses are
    lower-cased in the ledger, their domain in IDNA's Unicode form; the shop may keep them as
    typed (matched lower-cased), and with the ASCII (xn--) form of the domain. Phones are
    E.164 in the ledger; the shop may keep them as a person typed them: each usual spelling
    is looked up, by equality, so that an index on the column serves."""
    if channel == "email":
        return list(dict.fromkeys((address, ascii_email(address))))
    return phone_forms(address, phone_region)


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
