"""What ``backfill`` reads, page by page in bounded memory: the app's mapped shop table
(``bridge/ops/backfill_table.py``) or a file the shop exported (``bridge/ops/backfill_file.py``).

A source gives candidates (a row's fields as read, before they are checked), the rows it could
not read at all, and after each page the position the next page starts from, which the run
checkpoints once the page's rows are confirmed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


class SourceError(Exception):
    """A source that cannot be read at all (no primary key, no header): nothing is sent."""


@dataclass(frozen=True)
class Invalid:
    """A row that is no valid shop row: where it is (``line 12``, ``subscriber_id=5``), why."""

    where: str
    reason: str


@dataclass(frozen=True)
class Candidate:
    """One row's fields as read: ``email``, ``subscriber_status``, ``phone``,
    ``sms_subscriber_status``, ``changed_at`` (statuses already 1, 0 or None)."""

    where: str
    fields: dict[str, Any]
    observed_at: datetime


@dataclass(frozen=True)
class Page:
    # In the source's order, the rows it could not read in their places.
    rows: list[Candidate | Invalid] = field(default_factory=list)
    # JSON-ready: where the page after this one starts.
    position: Any = None

    @property
    def candidates(self) -> list[Candidate]:
        return [row for row in self.rows if isinstance(row, Candidate)]

    @property
    def read(self) -> int:
        return len(self.rows)


class Source(Protocol):
    """A table or a file, named so that a run resumes only on the source it started on."""

    # 'table:"public"."newsletter_subscriber"' or 'file:/abs/path.csv'
    label: str
    # What the source was when a run started: a run is not resumed on another version.
    version: str

    async def total(self) -> int | None:
        """About how many rows there are (for the ETA), None when unknown."""
        ...

    def pages(self, position: Any) -> AsyncIterator[Page]:
        """The pages from ``position`` (None: the beginning) to the end."""
        ...


STATUS_WORDS = {"1": 1, "0": 0, "subscribed": 1, "unsubscribed": 0, "": None}


def parse_status(value: Any, name: str) -> int | None:
    """A file's status: 1/0/empty, or subscribed/unsubscribed; ValueError names the field."""
    if value is None:
        return None
    if type(value) is int and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in STATUS_WORDS:
        return STATUS_WORDS[value.strip().lower()]
    raise ValueError(f"{name} {value!r} is not 1, 0, subscribed, unsubscribed or empty")
