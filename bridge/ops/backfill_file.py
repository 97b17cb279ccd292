"""A file the shop exported as a backfill source: CSV with a header, or JSON lines, with the
fields ``email, subscriber_status, phone, sms_subscriber_status, changed_at``; statuses as
1/0/empty or subscribed/unsubscribed. Streamed a page at a time (in a thread: the event loop
keeps the broker's heartbeats), so a file of millions of rows is never held whole.

Every row of a file was read at the same moment as far as the bridge can tell: when the shop
exported it, which the file's modification time records (or ``--observed-at`` says): the
shop held those statuses then, and any change the bridge learned of later is newer."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from bridge.ops.backfill_source import Candidate, Invalid, Page, SourceError, parse_status

FileFormat = Literal["csv", "jsonl"]
REQUIRED = ("email", "subscriber_status")
FIELDS = ("email", "subscriber_status", "phone", "sms_subscriber_status", "changed_at")
_ENCODING = "utf-8-sig"  # a spreadsheet's byte-order mark is no part of the first name
# One record as read: its fields, why it is unreadable, or nothing (a blank line).
Record = tuple[str, dict[str, Any] | str | None]


def format_of(path: Path) -> FileFormat:
    """The format a file's name says: ``.csv``, or ``.jsonl``/``.ndjson``/``.json``."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise SourceError(f"{path.name}: cannot tell the format from the name; give --format")


class FileSource:
    """``path`` read as ``kind``, its rows observed at ``observed_at`` (default: its mtime)."""

    def __init__(
        self, path: Path, kind: FileFormat, page_size: int, observed_at: datetime | None = None
    ) -> None:
        try:
            stat = path.stat()
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
        self._path = path
        self._kind = kind
        self._page_size = page_size
        self.label = f"file:{path.resolve()}"
        self.version = f"{stat.st_size}:{stat.st_mtime_ns}"
        self.observed_at = observed_at or datetime.fromtimestamp(stat.st_mtime, UTC)
        self.check()

    def check(self) -> None:
        """:class:`SourceError` for a file that cannot be opened, or a CSV whose header lacks
        a required field: found before anything is sent."""
        with self._open() as handle:
            if self._kind == "csv":
                _header(handle)

    async def total(self) -> int | None:
        lines = await asyncio.to_thread(_count_lines, self._path)
        return max(lines - (1 if self._kind == "csv" else 0), 0)

    async def pages(self, position: Any) -> AsyncIterator[Page]:
        done = int(position or 0)
        with self._open() as handle:
            records = _csv(handle) if self._kind == "csv" else _jsonl(handle)
            # A resumed run starts after the records its last checkpoint counted.
            await asyncio.to_thread(lambda: next(itertools.islice(records, done, done), None))
            while chunk := await asyncio.to_thread(
                lambda: list(itertools.islice(records, self._page_size))
            ):
                done += len(chunk)
                yield self._page(chunk, done)

    def _page(self, chunk: list[Record], done: int) -> Page:
        read: list[Candidate | Invalid] = []
        for where, record in chunk:
            if record is None:
                continue
            if isinstance(record, str):
                read.append(Invalid(where, record))
                continue
            try:
                read.append(Candidate(where, _fields(record), self.observed_at))
            except ValueError as exc:
                read.append(Invalid(where, str(exc)))
        return Page(read, done)

    def _open(self) -> TextIO:
        try:
            return self._path.open(encoding=_ENCODING, newline="")
        except OSError as exc:
            raise SourceError(f"cannot read {self._path}: {exc.strerror or exc}") from None


def _header(handle: TextIO) -> tuple[list[str], str]:
    """The CSV's field names (trimmed, lower case) and its delimiter (``,``, ``;`` or tab, as
    spreadsheets in different languages write them)."""
    first = handle.readline()
    if not first.strip():
        raise SourceError("the file is empty: a CSV starts with a header naming its fields")
    counts = {delimiter: first.count(delimiter) for delimiter in (",", ";", "\t")}
    delimiter = max(counts, key=lambda d: counts[d])
    names = [name.strip().lower() for name in next(csv.reader([first], delimiter=delimiter))]
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise SourceError(
            f"the header has no {' and no '.join(missing)} field (it names {', '.join(names)}; "
            f"the fields are {', '.join(FIELDS)})"
        )
    return names, delimiter


def _csv(handle: TextIO) -> Iterator[Record]:
    names, delimiter = _header(handle)
    reader = csv.reader(handle, delimiter=delimiter)
    for values in reader:
        where = f"line {reader.line_num + 1}"
        if not any(value.strip() for value in values):
            yield where, None
        elif len(values) != len(names):
            yield where, f"{len(values)} fields where the header names {len(names)}"
        else:
            yield where, dict(zip(names, values, strict=True))


def _jsonl(handle: TextIO) -> Iterator[Record]:
    for number, line in enumerate(handle, start=1):
        where = f"line {number}"
        if not line.strip():
            yield where, None
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))
        except ValueError as exc:
            yield where, f"not JSON: {exc.msg} at column {exc.colno}"
            continue
        if not isinstance(record, dict):
            yield where, "not a JSON object"
        elif "subscriber_status" not in record:
            yield where, "no subscriber_status field"
        else:
            yield where, {str(name).lower(): value for name, value in record.items()}


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    """A record's fields for a shop row; ValueError says what is wrong with it."""
    email = record.get("email")
    if not isinstance(email, str) or not email.strip():
        raise ValueError("no e-mail address")
    phone = record.get("phone")
    changed_at = record.get("changed_at")
    if isinstance(changed_at, str):
        changed_at = changed_at.strip() or None
    return {
        "email": email.strip(),
        "subscriber_status": parse_status(record["subscriber_status"], "subscriber_status"),
        "phone": (str(phone).strip() or None) if phone is not None else None,
        "sms_subscriber_status": parse_status(
            record.get("sms_subscriber_status"), "sms_subscriber_status"
        ),
        "changed_at": changed_at,
    }


def _count_lines(path: Path) -> int:
    """Lines in the file, read in blocks (an estimate of its rows, for the ETA)."""
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")
