"""An export of edrone's customers (from edrone's panel), loaded for ``reconcile``: edrone has no
API to read a status back (docs/protocol.md §5), so such a file is the only way to see what
edrone holds.

The file is CSV with a header line, or JSON lines (one object per line), with the fields
``email``, ``subscriber_status`` (``1``, ``0``, empty: unknown) and optionally ``phone``,
``sms_subscriber_status`` and ``changed_at`` (when edrone's status was set, ISO 8601 or
``YYYY-MM-DD HH:MM:SS``; UTC unless it says otherwise). It is read line by line into a
temporary table of the connection (COPY), never held in memory whole; the first bad line stops
the load with :class:`ExportError` naming it."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from schemas.fields import normalise_email, normalise_phone

TABLE = "reconcile_export"
REQUIRED = ("email", "subscriber_status")
FIELDS = (*REQUIRED, "phone", "sms_subscriber_status", "changed_at")

_CREATE_SQL = f"""
CREATE TEMPORARY TABLE {TABLE} (
    channel     text        NOT NULL,
    address     text        NOT NULL,
    status      smallint,
    -- When edrone set it, if the file says; ``at`` is that or, undated, the file's own time.
    changed_at  timestamptz,
    at          timestamptz NOT NULL
) ON COMMIT PRESERVE ROWS
"""
_STATUSES = {"1": 1, "0": 0, "": None, "true": 1, "false": 0}


class ExportError(Exception):
    """The export file cannot be read: the message names the file, the line and why."""


async def load_export(conn: asyncpg.Connection, path: Path, *, phone_region: str, sms: bool) -> int:
    """Load ``path`` into the temporary table ``reconcile_export`` of ``conn`` (one row per
    address and channel: SMS rows only with ``sms``); the number of rows loaded."""
    handle, file_time = _open(path)
    with handle:
        records = _records(path, handle, file_time, phone_region, sms)
        await conn.execute(_CREATE_SQL)
        try:
            await conn.copy_records_to_table(
                TABLE,
                records=records,
                columns=["channel", "address", "status", "changed_at", "at"],
            )
        except UnicodeDecodeError:
            raise ExportError(f"{path}: not UTF-8 text") from None
    await conn.execute(f"ANALYZE {TABLE}")
    return int(await conn.fetchval(f"SELECT count(*) FROM {TABLE}"))


def _open(path: Path) -> tuple[Any, datetime]:
    """The file, and its time: when it was written (the time of an undated line)."""
    try:
        file_time = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        return path.open(encoding="utf-8-sig", newline=""), file_time
    except OSError as exc:
        raise ExportError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _records(
    path: Path, handle: Any, file_time: datetime, phone_region: str, sms: bool
) -> Iterator[tuple[Any, ...]]:
    first = handle.readline()
    if not first.strip():
        raise ExportError(f"{path}: empty, expected a CSV header or JSON lines")
    if first.lstrip().startswith("{"):
        lines = _json_lines(path, first, handle)
    else:
        lines = _csv_lines(path, first, handle)
    for number, fields in lines:
        yield from _rows(path, number, fields, file_time, phone_region, sms)


def _csv_lines(path: Path, first: str, handle: Any) -> Iterator[tuple[int, dict[str, str]]]:
    header = [name.strip().lower() for name in next(csv.reader([first]))]
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise ExportError(
            f"{path}: line 1: the header has no {', '.join(missing)} column "
            f"(expected {', '.join(FIELDS)}; got {', '.join(header) or 'nothing'})"
        )
    for number, values in enumerate(csv.reader(handle), start=2):
        if not values:
            continue
        if len(values) != len(header):
            raise ExportError(f"{path}: line {number}: {len(values)} fields, the header has "
                              f"{len(header)}")  # fmt: skip
        yield number, dict(zip(header, values, strict=True))


def _json_lines(path: Path, first: str, handle: Any) -> Iterator[tuple[int, dict[str, str]]]:
    yield 1, _json_fields(path, 1, first)
    for number, line in enumerate(handle, start=2):
        if line.strip():
            yield number, _json_fields(path, number, line)


def _json_fields(path: Path, number: int, line: str) -> dict[str, str]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: line {number}: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: line {number}: not a JSON object")
    missing = [name for name in REQUIRED if name not in value]
    if missing:
        raise ExportError(f"{path}: line {number}: no {', '.join(missing)} field")
    return {str(k).lower(): "" if v is None else str(v) for k, v in value.items()}


def _rows(
    path: Path,
    number: int,
    fields: dict[str, str],
    file_time: datetime,
    phone_region: str,
    sms: bool,
) -> Iterator[tuple[Any, ...]]:
    where = f"{path}: line {number}"
    try:
        email = normalise_email(fields["email"])
    except ValueError as exc:
        raise ExportError(f"{where}: email: {exc}") from None
    changed_at = _date(where, fields.get("changed_at", ""))
    at = changed_at or file_time
    yield ("email", email, _status(where, "subscriber_status", fields["subscriber_status"]),
           changed_at, at)  # fmt: skip
    phone = fields.get("phone", "").strip()
    if sms and phone and "sms_subscriber_status" in fields:
        try:
            address = normalise_phone(phone, phone_region)
        except ValueError as exc:
            raise ExportError(f"{where}: phone: {exc}") from None
        status = _status(where, "sms_subscriber_status", fields["sms_subscriber_status"])
        yield ("sms", address, status, changed_at, at)


def _status(where: str, name: str, text: str) -> int | None:
    value = _STATUSES.get(text.strip().lower(), -1)
    if value == -1:
        raise ExportError(f"{where}: {name}: {text!r} is not 1, 0 or empty")
    return value


def _date(where: str, text: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(f"{where}: changed_at: {text!r} is not a date and time") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
