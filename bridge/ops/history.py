"""An address's history, both ways: every change edrone and the shop made, what the bridge did
itself (traces, writes, corrections), in the order it learned them, each with the decision and
why; and the address's sync state now. Read-only; ``edrone-bridge history`` prints it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from schemas.fields import DEFAULT_PHONE_REGION, normalise_email, normalise_phone
from schemas.reasons import reason_name
from schemas.subscription import status_name

# edrone's webhooks keep their line of history in the inbox; the rest is in sync_history.
_LINES_SQL = """
SELECT i.channel, i.address, i.sync_seq AS seq, 'edrone' AS origin, 'webhook' AS kind,
       i.event_id, i.status, i.reason, COALESCE(i.ordered_at, i.event_date) AS made_at,
       i.processed_at AS learned_at,
       COALESCE(i.sync_decision, i.outcome) AS decision, COALESCE(i.sync_why, '') AS why
FROM inbox AS i
WHERE i.app_id = $1 AND (i.channel, i.address) IN (SELECT * FROM unnest($2::text[], $3::text[]))
UNION ALL
SELECT h.channel, h.address, h.seq, h.origin, h.kind, h.event_id, h.status, h.reason,
       h.made_at, h.learned_at, h.decision, h.why
FROM sync_history AS h
WHERE h.app_id = $1 AND (h.channel, h.address) IN (SELECT * FROM unnest($2::text[], $3::text[]))
ORDER BY channel, seq NULLS FIRST, learned_at
"""
_STATE_SQL = """
SELECT * FROM sync_state
WHERE app_id = $1 AND (channel, address) IN (SELECT * FROM unnest($2::text[], $3::text[]))
ORDER BY channel, address
"""
# The SMS addresses of a customer known by e-mail, and the reverse.
_RELATED_SQL = """
SELECT channel, address FROM sync_state
WHERE app_id = $1 AND ((channel = 'sms' AND email = $2) OR (channel = 'email' AND address = $2))
"""
_APPS_SQL = """
SELECT DISTINCT app_id FROM sync_state WHERE address = ANY($1::text[]) OR email = ANY($1::text[])
UNION SELECT DISTINCT app_id FROM inbox WHERE address = ANY($1::text[])
ORDER BY 1
"""


@dataclass(frozen=True)
class Line:
    channel: str
    address: str
    seq: int | None
    origin: str  # edrone | shop | bridge
    kind: str  # webhook | shop_change | trace | write | reconcile
    event_id: str | None
    status: int | None
    reason: int | None
    reason_name: str | None
    made_at: datetime | None
    learned_at: datetime
    decision: str
    why: str


@dataclass(frozen=True)
class Now:
    """The address's sync state: the winner, and what each side is known to hold."""

    channel: str
    address: str
    winner_status: int | None
    winner_side: str | None
    winner_made_at: datetime | None
    winner_event_id: str | None
    edrone_status: int | None
    edrone_known: bool
    shop_status: int | None
    shop_known: bool


@dataclass(frozen=True)
class History:
    app_id: str
    addresses: list[tuple[str, str]]
    lines: list[Line]
    now: list[Now]

    def to_json(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return value.isoformat() if isinstance(value, datetime) else value

        return {
            "app_id": self.app_id,
            "addresses": [{"channel": c, "address": a} for c, a in self.addresses],
            "lines": [{k: plain(v) for k, v in asdict(line).items()} for line in self.lines],
            "now": [{k: plain(v) for k, v in asdict(now).items()} for now in self.now],
        }


def addresses_of(text: str, phone_region: str = DEFAULT_PHONE_REGION) -> tuple[str, str]:
    """(channel, address) as the bridge keeps it: an e-mail in its one form, else a phone in
    E.164 (read in ``phone_region`` without its country code), or as typed if it is no
    valid number. Raises ValueError for an invalid e-mail address."""
    if "@" in text:
        return "email", normalise_email(text)
    try:
        return "sms", normalise_phone(text, phone_region)
    except ValueError:
        return "sms", text.strip()


def _asked(channel: str, address: str, text: str) -> set[tuple[str, str]]:
    """The keys ``text`` (read as ``channel`` and ``address``) names: its one form, and for a
    phone also the form typed, which a row stored before phones were normalised may still
    have."""
    return (
        {(channel, address), (channel, text.strip())} if channel == "sms" else {(channel, address)}
    )


async def apps_of(
    conn: asyncpg.Connection, text: str, phone_region: str = DEFAULT_PHONE_REGION
) -> list[str]:
    """The apps that know the address ``text`` (an e-mail or a phone)."""
    channel, address = addresses_of(text, phone_region)
    addresses = sorted({known for _, known in _asked(channel, address, text)})
    return [row["app_id"] for row in await conn.fetch(_APPS_SQL, addresses)]


async def read_history(
    conn: asyncpg.Connection, app_id: str, text: str, phone_region: str = DEFAULT_PHONE_REGION
) -> History:
    """The history of the address ``text`` (an e-mail or a phone) in ``app_id``, with the
    customer's other channel where the bridge knows it."""
    channel, address = addresses_of(text, phone_region)
    keys = _asked(channel, address, text)
    if channel == "email":
        keys.update(
            (r["channel"], r["address"]) for r in await conn.fetch(_RELATED_SQL, app_id, address)
        )
    ordered = sorted(keys)
    columns = [[c for c, _ in ordered], [a for _, a in ordered]]
    lines = [_line(row) for row in await conn.fetch(_LINES_SQL, app_id, *columns)]
    now = [_now(row) for row in await conn.fetch(_STATE_SQL, app_id, *columns)]
    # A phone's typed form is shown only where a row still has it.
    known = {(x.channel, x.address) for x in [*lines, *now]} | {(channel, address)}
    return History(app_id, [key for key in ordered if key in known], lines, now)


def _line(row: asyncpg.Record) -> Line:
    return Line(
        row["channel"],
        row["address"],
        row["seq"],
        row["origin"],
        row["kind"],
        row["event_id"],
        row["status"],
        row["reason"],
        reason_name(row["channel"], row["reason"]),
        row["made_at"],
        row["learned_at"],
        row["decision"],
        row["why"],
    )


def _now(row: asyncpg.Record) -> Now:
    return Now(
        row["channel"],
        row["address"],
        row["status"],
        row["side"],
        row["made_at"],
        row["event_id"],
        row["edrone_status"],
        row["edrone_known"],
        row["shop_status"],
        row["shop_known"],
    )


COLUMNS = ("SEQ", "LEARNED", "ORIGIN", "KIND", "STATUS", "MADE AT", "DECISION", "EVENT", "WHY")


def render(history: History) -> str:
    """A table for people, one per channel, then the state now."""
    if not history.lines and not history.now:
        return f"app {history.app_id}: the bridge knows nothing of this address"
    out = [f"app {history.app_id}"]
    for channel, address in history.addresses:
        rows = [
            (
                "" if line.seq is None else str(line.seq),
                line.learned_at.isoformat(timespec="milliseconds"),
                line.origin,
                line.kind,
                status_name(line.status)
                + (f" ({line.reason_name or line.reason})" if line.reason is not None else ""),
                line.made_at.isoformat(timespec="milliseconds") if line.made_at else "",
                line.decision,
                line.event_id or "",
                line.why,
            )
            for line in history.lines
            if (line.channel, line.address) == (channel, address)
        ]
        out += ["", f"{channel} {address}", *_table(COLUMNS, rows)]
        for now in history.now:
            if (now.channel, now.address) == (channel, address):
                out.append(_summary(now))
    return "\n".join(out)


def _summary(now: Now) -> str:
    if now.winner_side is None:
        winner = "no change known"
    else:
        made = now.winner_made_at.isoformat(timespec="milliseconds") if now.winner_made_at else "?"
        winner = f"{status_name(now.winner_status)}, {now.winner_side}'s change of {made}"
    edrone = status_name(now.edrone_status) if now.edrone_known else "unknown"
    shop = status_name(now.shop_status) if now.shop_known else "unknown"
    return f"now: winner {winner}; edrone holds {edrone}; the shop holds {shop}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return lines
