"""Where the shop's mapped table, the bridge's sync state and (given an export of edrone's) edrone
differ, per address, and why: one SQL comparison, shared by ``reconcile`` (which lists the
addresses through a server-side cursor, so that millions of rows never sit in memory) and the
scheduled drift check (which only counts them).

The kinds of difference, the first that fits:

- ``missing_in_shop``: the bridge knows the shop held the address; its table has no row now.
- ``never_synced``: a row the bridge knows nothing of (no winner), or whose status differs from
  the winner while the bridge never learned what the shop holds.
- ``shop_changed_unseen``: the row differs from what the bridge knows the shop holds (SQL with
  the trigger off, a restored backup).
- ``needs_review``: such a row that would resubscribe an address the bridge knows unsubscribed;
  the rule leaves it for a person (consumers/shop_rows.py), so ``--repair`` does too.
- ``shop_behind``: the row is what the bridge knows the shop holds, but not the winner (a write
  that never happened).
- ``edrone_changed_unseen``: the export says edrone holds another status than the bridge knows,
  later than the bridge learned it (a change without a webhook: a CSV import, a lost webhook).
- ``edrone_behind``: edrone is not known to hold the winner, and no trace of it is open.

Which side should win (``winner``: shop, edrone, state or none) is the rule's verdict told
roughly (by the dates, as consumers/shop_rows.py and consumers/sync.py order them): at repair
time the consumers decide, with the rule itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import phonenumbers

from bridge.shop_table import ShopTarget

KINDS = (
    "missing_in_shop",
    "never_synced",
    "shop_changed_unseen",
    "needs_review",
    "shop_behind",
    "edrone_changed_unseen",
    "edrone_behind",
)
# The kinds ``reconcile --repair`` cannot settle: a person's decision, a row gone.
UNREPAIRABLE = frozenset({"needs_review", "missing_in_shop"})


@dataclass(frozen=True)
class Difference:
    """One address (of one channel) where the sides differ; None where a side says nothing."""

    channel: str
    address: str
    kind: str
    winner: str | None  # shop | edrone | state | None (nothing to repair)
    # The shop's row: found, its status, when the shop set it (a changed_at column), and
    # the customer's e-mail and e-mail status (for an SMS row's repair).
    has_row: bool
    row_status: int | None
    row_changed_at: datetime | None
    row_email: str | None
    row_email_status: int | None
    # The sync state: the winner, and what each side is known to hold.
    side: str | None
    status: int | None
    made_at: datetime | None
    shop_known: bool
    shop_status: int | None
    shop_at: datetime | None
    edrone_known: bool
    edrone_status: int | None
    edrone_at: datetime | None
    # The export's line, if one was loaded and has the address.
    in_export: bool
    export_status: int | None
    export_at: datetime | None
    export_dated: bool
    export_differs: bool

    def to_json(self) -> dict[str, Any]:
        def at(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "channel": self.channel,
            "address": self.address,
            "kind": self.kind,
            "winner": self.winner,
            "why": why(self),
            "shop": {"row": self.has_row, "status": self.row_status,
                     "changed_at": at(self.row_changed_at)},
            "state": {"side": self.side, "status": self.status, "made_at": at(self.made_at),
                      "shop_known": self.shop_known, "shop_status": self.shop_status,
                      "shop_at": at(self.shop_at), "edrone_known": self.edrone_known,
                      "edrone_status": self.edrone_status, "edrone_at": at(self.edrone_at)},
            "export": {"found": self.in_export, "status": self.export_status,
                       "at": at(self.export_at), "dated": self.export_dated},
        }  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    """What to compare: one app's table, the export's temporary table if loaded, and how
    long a change may take to travel before a difference counts (None: every one counts)."""

    target: ShopTarget
    phone_region: str
    export: bool = False
    settle_s: float | None = None

    def channels(self) -> list[str]:
        return ["email", *(["sms"] if self.target.status_column("sms") is not None else [])]


async def differences(
    conn: asyncpg.Connection, comparison: Comparison, *, chunk: int = 1_000
) -> AsyncIterator[Difference]:
    """Every differing address, channel by channel, in address order, fetched ``chunk`` at a
    time; ``conn`` must be in a transaction (REPEATABLE READ: one snapshot for all channels)."""
    for channel in comparison.channels():
        sql, args = _sql(comparison, channel, "SELECT * FROM classified ORDER BY address")
        async for row in conn.cursor(sql, *args, prefetch=chunk):
            yield _difference(channel, row)


async def count(conn: asyncpg.Connection, comparison: Comparison) -> Counter[str]:
    """How many addresses differ, by kind (every kind present, zeros included)."""
    counts: Counter[str] = Counter({kind: 0 for kind in KINDS})
    for channel in comparison.channels():
        sql, args = _sql(comparison, channel, "SELECT kind, count(*) FROM classified GROUP BY 1")
        for row in await conn.fetch(sql, *args):
            counts[row["kind"]] += row["count"]
    return counts


def why(d: Difference) -> str:
    """The difference in words, with the dates it was judged by."""
    row = _status(d.row_status)
    if d.kind == "missing_in_shop":
        return f"the shop held {_status(d.shop_status)} (as of {_at(d.shop_at)}); no row now"
    if d.kind in ("never_synced", "shop_changed_unseen", "needs_review"):
        dated = f"set at {_at(d.row_changed_at)}" if d.row_changed_at else "undated"
        if d.side is None:
            told = "the bridge knows nothing of it"
        elif d.shop_known:
            told = f"the bridge knows the shop held {_status(d.shop_status)} at {_at(d.shop_at)}"
        else:
            told = "the bridge never learned what the shop holds"
        said = f"the shop's row says {row} ({dated}); {told}"
        if d.side is not None:
            said += f"; the winner is {d.side}'s {_status(d.status)} of {_at(d.made_at)}"
        if d.kind == "needs_review":
            return said + ": it would resubscribe a known unsubscribe, left for a person"
        return said + (": the row wins" if d.winner == "shop" else ": the winner stands")
    if d.kind == "shop_behind":
        return (
            f"the shop holds {row}, the winner is {d.side}'s {_status(d.status)} of "
            f"{_at(d.made_at)}: a write that never happened"
        )
    if d.kind == "edrone_changed_unseen":
        known = (
            f"{_status(d.edrone_status)} as of {_at(d.edrone_at)}" if d.edrone_known else "nothing"
        )
        dated = "" if d.export_dated else " (undated: the file's time)"
        verdict = "edrone's change wins" if d.winner == "edrone" else "the winner stands"
        return (
            f"the export says edrone holds {_status(d.export_status)} at {_at(d.export_at)}"
            f"{dated}; the bridge knew {known}: {verdict}"
        )
    held = _status(d.edrone_status) if d.edrone_known else "nothing known"
    return (
        f"edrone holds {held}, the winner is {d.side}'s {_status(d.status)} of "
        f"{_at(d.made_at)}, and no trace of it is open"
    )


def _status(status: int | None) -> str:
    return {1: "subscribed", 0: "unsubscribed"}.get(status, "unknown")  # type: ignore[arg-type]


def _at(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "?"


def _difference(channel: str, row: asyncpg.Record) -> Difference:
    return Difference(
        channel, row["address"], row["kind"], row["winner"], row["has_row"], row["row_status"],
        row["row_changed_at"], row["row_email"], row["row_email_status"], row["side"],
        row["status"], row["made_at"], bool(row["shop_known"]), row["shop_status"],
        row["shop_at"], bool(row["edrone_known"]), row["edrone_status"], row["edrone_at"],
        row["in_export"], row["export_status"], row["export_at"], bool(row["export_dated"]),
        bool(row["export_differs"]),
    )  # fmt: skip


# --- the SQL ---------------------------------------------------------------------------------


def _address_sql(channel: str, column: str, calling_code: int) -> str:
    """The bridge's form of a shop's address, approximated in SQL. E-mail: trimmed and
    lower-cased (the bridge also writes IDNA domains in Unicode form: a shop row holding the
    ``xn--`` form shows as never synced beside the state's missing row). Phone: E.164 read as
    the usual spellings are (``+48 500...``, ``0048...``, national digits in the bridge's
    region), without the numbering plans phonenumbers knows."""
    if channel == "email":
        return f"lower(btrim({column}::text))"
    digits = f"regexp_replace({column}::text, '\\D', '', 'g')"
    return (
        f"CASE WHEN btrim({column}::text) LIKE '+%' THEN '+' || {digits} "
        f"WHEN {digits} LIKE '00%' THEN '+' || substr({digits}, 3) "
        f"ELSE '+{calling_code}' || ltrim({digits}, '0') END"
    )


def _status_sql(column: str, first: int) -> str:
    # As the outbox trigger reads it (0003_outbox.sql): the value's text as to_jsonb renders
    # it, against the canonical texts of the mapping; anything else is unknown.
    return f"CASE to_jsonb({column}) #>> '{{}}' WHEN ${first} THEN 1 WHEN ${first + 1} THEN 0 END"


def _sql(comparison: Comparison, channel: str, final: str) -> tuple[str, list[Any]]:
    target = comparison.target
    status = target.status_column(channel)
    assert status is not None
    calling_code = phonenumbers.country_code_for_region(comparison.phone_region)
    address = _address_sql(channel, f"t.{target.match_column(channel).sql}", calling_code)
    email = _address_sql("email", f"t.{target.match_column('email').sql}", calling_code)
    email_status = target.status_column("email")
    assert email_status is not None
    changed = target.mapping.changed_at_column
    # A timestamp without a zone is read in the session's TimeZone, as PostgreSQL casts it.
    changed_sql = "NULL::timestamptz"
    if changed is not None:
        changed_sql = f"t.{target.columns[changed].sql}::timestamptz"
    values = target.values[channel]
    args: list[Any] = [target.app_id, channel, values[1], values[0]]
    args += [target.values["email"][1], target.values["email"][0]]
    settle = comparison.settle_s
    args.append(float(settle or 0))
    export = (
        "SELECT DISTINCT ON (address) address, status, changed_at, at FROM reconcile_export "
        "WHERE channel = $2 ORDER BY address, at DESC"
        if comparison.export
        else "SELECT NULL::text AS address, NULL::smallint AS status, "
        "NULL::timestamptz AS changed_at, NULL::timestamptz AS at WHERE false"
    )
    # A change on its way (an outbox row not yet read, an address the bridge acted on lately)
    # is no drift yet; only the scheduled check, which must not count traffic, waits for it.
    outbox_address = _address_sql(
        channel, "o.email" if channel == "email" else "o.phone", calling_code
    )
    unsettled = (
        f"AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.app_id = $1 "
        f"AND (o.sent_at IS NULL OR o.sent_at > now() - $7 * interval '1 second') "
        f"AND {outbox_address} = j.address) "
        f"AND (j.updated_at IS NULL OR j.updated_at <= now() - $7 * interval '1 second')"
        if settle is not None
        else "AND $7::float8 IS NOT NULL"
    )
    sql = f"""
WITH shop AS (
    SELECT address, min(status) AS status, max(changed_at) AS changed_at,
           min(email) AS email, min(email_status) AS email_status
    FROM (
        SELECT {address} AS address, {_status_sql(f"t.{status.sql}", 3)} AS status,
               {changed_sql} AS changed_at, {email} AS email,
               {_status_sql(f"t.{email_status.sql}", 5)} AS email_status
        FROM {target.table_sql} AS t
    ) AS r
    WHERE address IS NOT NULL AND address NOT IN ('', '+', '+{calling_code}')
    GROUP BY address
), state AS (
    SELECT * FROM sync_state WHERE app_id = $1 AND channel = $2
), export AS ({export}
), j AS (
    SELECT coalesce(s.address, st.address, e.address) AS address,
           s.address IS NOT NULL AS has_row, s.status AS row_status,
           s.changed_at AS row_changed_at, s.email AS row_email,
           s.email_status AS row_email_status,
           st.side, st.status, st.made_at, coalesce(st.shop_known, false) AS shop_known,
           st.shop_status, st.shop_at, coalesce(st.edrone_known, false) AS edrone_known,
           st.edrone_status, st.edrone_at, coalesce(st.edrone_seen, 0) AS edrone_seen,
           coalesce(st.open_traces, 0) AS open_traces, st.updated_at,
           e.address IS NOT NULL AS in_export, e.status AS export_status, e.at AS export_at,
           e.changed_at IS NOT NULL AS export_dated
    FROM shop AS s
    FULL JOIN state AS st ON st.address = s.address
    FULL JOIN export AS e ON e.address = coalesce(s.address, st.address)
), compared AS (
    -- The export tells of edrone later than the bridge learned it, and otherwise.
    SELECT j.*, in_export AND CASE WHEN edrone_known
                    THEN export_status IS DISTINCT FROM edrone_status
                         AND (edrone_at IS NULL OR export_at > edrone_at)
                    ELSE export_status IS NOT NULL END AS export_differs
    FROM j
), judged AS (
    SELECT j.*,
           CASE
               WHEN NOT has_row AND shop_known THEN 'missing_in_shop'
               WHEN has_row AND side IS NULL AND row_status IS NOT NULL THEN 'never_synced'
               WHEN has_row AND side IS NOT NULL AND NOT shop_known
                    AND row_status IS DISTINCT FROM status THEN 'never_synced'
               WHEN has_row AND shop_known AND row_status IS DISTINCT FROM shop_status
                    THEN 'shop_changed_unseen'
               WHEN has_row AND shop_known AND side IS NOT NULL
                    AND status IS DISTINCT FROM shop_status THEN 'shop_behind'
               WHEN export_differs THEN 'edrone_changed_unseen'
               WHEN side IS NOT NULL AND open_traces = 0
                    AND (NOT edrone_known OR edrone_status IS DISTINCT FROM status
                         OR edrone_seen NOT IN (1, 2, 4)) THEN 'edrone_behind'
           END AS kind,
           -- The row's verdict as consumers/shop_rows.py gives it: dated by its own date,
           -- else later than anything known if the shop changed since the bridge last
           -- learned it, else an unsubscribe goes first and the winner stands otherwise.
           CASE
               WHEN side IS NULL THEN true
               WHEN row_changed_at IS NOT NULL THEN row_changed_at > made_at
               WHEN shop_known AND made_at <= shop_at THEN true
               ELSE row_status = 0 AND status IS DISTINCT FROM 0
           END AS row_wins
    FROM compared AS j
    WHERE true {unsettled}
), classified AS (
    SELECT address, has_row, row_status, row_changed_at, row_email, row_email_status, side,
           status, made_at, shop_known, shop_status, shop_at, edrone_known, edrone_status,
           edrone_at, in_export, export_status, export_at, export_dated, export_differs,
           CASE WHEN kind IN ('never_synced', 'shop_changed_unseen') AND row_wins
                     AND status = 0 AND row_status = 1 THEN 'needs_review'
                ELSE kind END AS kind,
           CASE
               WHEN kind = 'missing_in_shop' THEN NULL
               WHEN kind IN ('never_synced', 'shop_changed_unseen') AND row_wins
                    AND status = 0 AND row_status = 1 THEN NULL
               WHEN kind IN ('never_synced', 'shop_changed_unseen') AND row_wins THEN 'shop'
               WHEN kind = 'edrone_changed_unseen' AND (side IS NULL OR export_at > made_at)
                    THEN 'edrone'
               ELSE 'state'
           END AS winner
    FROM judged
    WHERE kind IS NOT NULL
)
{final}
"""
    return sql, args
