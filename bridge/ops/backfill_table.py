"""The app's mapped shop table as a backfill source: read as the outbox trigger reads it
(``schemas/migrations/0003_outbox.sql``: ``to_jsonb(row) ->> column`` compared with the
canonical texts of the configured values, any other value unknown; the e-mail trimmed), one
page per statement, in the order of the table's primary key from where the last page ended
(keyset pagination: a page costs the same at the millionth row as at the first)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from bridge.ops.backfill_source import Candidate, Invalid, Page, SourceError
from bridge.shop_table import ShopTarget, quote_ident

_PRIMARY_KEY_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type_sql
FROM pg_index AS i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisprimary
ORDER BY k.ord
"""


@dataclass(frozen=True)
class KeyColumn:
    name: str
    type_sql: str  # from format_type(): safe as a cast target


async def primary_key(
    conn: asyncpg.Pool | asyncpg.Connection, target: ShopTarget
) -> list[KeyColumn]:
    """The table's primary key columns, in key order; :class:`SourceError` without one."""
    rows = await conn.fetch(_PRIMARY_KEY_SQL, target.table_oid)
    if not rows:
        raise SourceError(
            f"table {target.table_sql} has no primary key: backfill reads it in the key's "
            "order, page after page (add one, or export the table to a file and use --file)"
        )
    return [KeyColumn(row["attname"], row["type_sql"]) for row in rows]


def page_sql(target: ShopTarget, key: Sequence[KeyColumn], page_size: int, *, after: bool) -> str:
    """One page: the rows after the position ($5...) when ``after``, in key order. Columns are
    read from the row's JSON, as the trigger reads them ($1..$4: the mapped columns' names)."""
    keys = [f"t.{quote_ident(column.name)}" for column in key]
    changed = target.mapping.changed_at_column
    changed_sql = f"t.{quote_ident(changed)}::timestamptz" if changed else "NULL::timestamptz"
    where = ""
    if after:
        bound = ", ".join(f"${5 + i}::text::{column.type_sql}" for i, column in enumerate(key))
        where = f"WHERE ({', '.join(keys)}) > ({bound})"
    return f"""
SELECT statement_timestamp() AS observed_at,
       ARRAY[{", ".join(f"{k}::text" for k in keys)}] AS key,
       btrim(j.doc ->> $1) AS email, j.doc ->> $2 AS email_status,
       j.doc ->> $3 AS phone, j.doc ->> $4 AS sms_status, {changed_sql} AS changed_at
FROM {target.table_sql} AS t CROSS JOIN LATERAL (SELECT to_jsonb(t) AS doc) AS j
{where}
ORDER BY {", ".join(keys)}
LIMIT {int(page_size)}"""


class TableSource:
    """The mapped table of ``target``, read through ``pool``."""

    def __init__(
        self, pool: asyncpg.Pool, target: ShopTarget, key: Sequence[KeyColumn], page_size: int
    ) -> None:
        self._pool = pool
        self._target = target
        self._key = list(key)
        self._page_size = page_size
        self.label = f"table:{target.table_sql}"
        self.version = ""
        # The canonical text of each configured value -> the status it stands for.
        self._statuses = {
            channel: {text: status for status, text in texts.items()}
            for channel, texts in target.values.items()
        }

    async def total(self) -> int | None:
        count = await self._pool.fetchval(f"SELECT count(*) FROM {self._target.table_sql}")
        return int(count)

    async def pages(self, position: Any) -> AsyncIterator[Page]:
        mapping = self._target.mapping
        names = (
            mapping.address_column,
            mapping.email_status_column,
            mapping.phone_column,
            mapping.sms_status_column,
        )
        first = page_sql(self._target, self._key, self._page_size, after=False)
        after = page_sql(self._target, self._key, self._page_size, after=True)
        while True:
            if position is None:
                rows = await self._pool.fetch(first, *names)
            else:
                rows = await self._pool.fetch(after, *names, *position)
            if not rows:
                return
            position = list(rows[-1]["key"])
            yield self._page(rows, position)
            if len(rows) < self._page_size:
                return

    def _page(self, rows: Sequence[asyncpg.Record], position: list[str]) -> Page:
        read: list[Candidate | Invalid] = []
        sms = self._target.mapping.sms_status_column is not None
        for row in rows:
            where = ", ".join(
                f"{column.name}={value}"
                for column, value in zip(self._key, row["key"], strict=True)
            )
            if not row["email"]:
                read.append(Invalid(where, "no e-mail address in the row"))
                continue
            fields = {
                "email": row["email"],
                "subscriber_status": _status(self._statuses["email"], row["email_status"]),
                "phone": row["phone"] or None,
                "sms_subscriber_status": (
                    _status(self._statuses["sms"], row["sms_status"]) if sms else None
                ),
                "changed_at": row["changed_at"],
            }
            read.append(Candidate(where, fields, row["observed_at"]))
        return Page(read, position)


def _status(texts: Mapping[str, int | None], text: str | None) -> int | None:
    """As the trigger reads it: a configured value's text, else unknown."""
    return texts.get(text) if text is not None else None
