"""The sync state in PostgreSQL: loaded and locked per address for one transaction, changed by
the rule in ``consumers/sync.py``, saved with the history of what was decided, the traces and
writes the bridge made, and the messages to publish after the commit (``dispatch``).

Rows are locked in key order, so competing replicas wait for each other and never deadlock."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from consumers.sync import (
    Held,
    OpenTrace,
    PendingWrite,
    Stamp,
    SyncState,
    Winner,
    trace_opened,
)

Key = tuple[str, str, str]  # (app_id, channel, address)

# One statement creates the missing rows and locks them all, in key order: a new address
# starts from edrone's ledger where it has a row (a deployment from before the sync state, or an
# address only edrone spoke of): edrone holds that, and it is the winner. ON CONFLICT DO UPDATE
# locks and returns an existing row; its open traces and awaited writes come along as JSON.
_LOCK_SQL = """
WITH k AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(app_id, channel, address)
)
INSERT INTO sync_state AS s (app_id, channel, address, seq, side, status, made_at, made_seq,
                             event_id, edrone_known, edrone_status, edrone_at, edrone_seq,
                             edrone_second, edrone_seen)
SELECT k.app_id, k.channel, k.address, CASE WHEN l.app_id IS NULL THEN 0 ELSE 1 END,
       CASE WHEN l.app_id IS NULL THEN NULL ELSE 'edrone' END, l.status, l.ordered_at,
       CASE WHEN l.app_id IS NULL THEN NULL ELSE 1 END, l.event_id, l.app_id IS NOT NULL,
       l.status, l.ordered_at, CASE WHEN l.app_id IS NULL THEN NULL ELSE 1 END,
       date_trunc('second', l.ordered_at),
       CASE WHEN l.app_id IS NULL THEN 0 WHEN l.status = 0 THEN 1 WHEN l.status = 1 THEN 2
            ELSE 4 END
FROM k LEFT JOIN subscribers AS l USING (app_id, channel, address)
ORDER BY 1, 2, 3
ON CONFLICT (app_id, channel, address) DO UPDATE SET seq = s.seq
RETURNING s.*
"""
_TRACES_SQL = """
SELECT t.* FROM sync_traces AS t
JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(app_id, channel, address)
  USING (app_id, channel, address)
WHERE t.state IN ('sending', 'sent', 'uncertain')
ORDER BY t.id
"""
_WRITES_SQL = """
SELECT w.* FROM sync_writes AS w
JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(app_id, channel, address)
  USING (app_id, channel, address)
WHERE w.state = 'expected'
ORDER BY w.written_at
"""
_SAVE_SQL = """
UPDATE sync_state AS s SET
    seq = v.seq, side = v.side, status = v.status, made_at = v.made_at, made_seq = v.made_seq,
    whole_seconds = v.whole_seconds, event_id = v.event_id,
    edrone_known = v.edrone_known, edrone_status = v.edrone_status, edrone_at = v.edrone_at,
    edrone_seq = v.edrone_seq, edrone_whole = v.edrone_whole,
    shop_known = v.shop_known, shop_status = v.shop_status, shop_at = v.shop_at,
    shop_seq = v.shop_seq, email = COALESCE(v.email, s.email), open_traces = v.open_traces,
    awaited_writes = v.awaited_writes, edrone_second = v.edrone_second,
    edrone_seen = v.edrone_seen, made_floor = v.made_floor, updated_at = now()
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::smallint[],
    $7::timestamptz[], $8::bigint[], $9::boolean[], $10::text[], $11::boolean[], $12::smallint[],
    $13::timestamptz[], $14::bigint[], $15::boolean[], $16::boolean[], $17::smallint[],
    $18::timestamptz[], $19::bigint[], $20::text[], $21::integer[], $22::integer[],
    $23::timestamptz[], $24::smallint[], $25::timestamptz[]
) AS v(app_id, channel, address, seq, side, status, made_at, made_seq, whole_seconds, event_id,
       edrone_known, edrone_status, edrone_at, edrone_seq, edrone_whole, shop_known,
       shop_status, shop_at, shop_seq, email, open_traces, awaited_writes, edrone_second,
       edrone_seen, made_floor)
WHERE s.app_id = v.app_id AND s.channel = v.channel AND s.address = v.address
"""
_HISTORY_SQL = """
INSERT INTO sync_history (app_id, channel, address, seq, origin, kind, event_id, status, reason,
                          made_at, decision, why)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                     $7::text[], $8::smallint[], $9::integer[], $10::timestamptz[], $11::text[],
                     $12::text[])
"""
_OPEN_TRACE_SQL = """
INSERT INTO sync_traces (app_id, channel, address, status, made_at, change_event_id, corrective,
                         state)
SELECT *, 'sending' FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[],
                                $5::timestamptz[], $6::text[], $7::boolean[])
RETURNING id, sent_at
"""
_CLOSE_TRACES_SQL = """
UPDATE sync_traces AS t SET state = c.state,
    closed_at = CASE WHEN c.state IN ('sending', 'sent', 'uncertain') THEN NULL ELSE now() END
FROM unnest($1::bigint[], $2::text[]) AS c(id, state)
WHERE t.id = c.id
"""
_NEW_WRITES_SQL = """
INSERT INTO sync_writes (write_id, app_id, channel, address, status, change_event_id, target,
                         written_at, state)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::smallint[], $6::text[],
                     $7::text[], $8::timestamptz[], $9::text[])
"""
_CLOSE_WRITES_SQL = """
UPDATE sync_writes AS w SET state = c.state, closed_at = now()
FROM unnest($1::uuid[], $2::text[]) AS c(write_id, state)
WHERE w.write_id = c.write_id
"""
_DISPATCH_SQL = """
INSERT INTO dispatch (exchange, routing_key, message_id, type, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
"""
_SEEN_SQL = """
INSERT INTO shop_inbox (app_id, event_id)
SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING
RETURNING app_id, event_id
"""


@dataclass(frozen=True)
class HistoryRow:
    key: Key
    seq: int  # the address's learning order
    origin: str  # edrone | shop | bridge
    kind: str  # webhook | shop_change | trace | write | reconcile
    event_id: str | None
    status: int | None
    reason: int | None
    made_at: datetime | None
    decision: str
    why: str


@dataclass(frozen=True)
class WriteRow:
    write_id: str
    key: Key
    status: int | None
    change_event_id: str
    target: str  # table | bus
    written_at: datetime
    echoes: bool


@dataclass(frozen=True)
class DispatchRow:
    """A message to publish once the transaction has committed."""

    exchange: str
    routing_key: str
    message_id: str
    type: str
    body: dict[str, Any]


@dataclass
class SyncBatch:
    """The sync states of some addresses, locked for one transaction, and what to save."""

    conn: asyncpg.Connection
    states: dict[Key, SyncState]
    emails: dict[Key, str] = field(default_factory=dict)
    history: list[HistoryRow] = field(default_factory=list)
    writes: list[WriteRow] = field(default_factory=list)
    dispatch: list[DispatchRow] = field(default_factory=list)

    async def open_traces(
        self, wanted: Sequence[tuple[Key, int | None, datetime, str, bool]]
    ) -> list[OpenTrace]:
        """Record traces about to be sent (``sending``), before the call: edrone's
        acknowledgement may come back before its answer does. (key, status, made_at,
        change_event_id, corrective) each; the open traces, in order."""
        if not wanted:
            return []
        rows = await self.conn.fetch(
            _OPEN_TRACE_SQL,
            *as_columns(
                [
                    (*key, status, made, event_id, fix)
                    for key, status, made, event_id, fix in wanted
                ],
                7,
            ),
        )
        traces = []
        for (key, status, made_at, _, corrective), row in zip(wanted, rows, strict=True):
            trace = OpenTrace(row["id"], status, made_at, row["sent_at"], "sending", corrective)
            trace_opened(self.states[key], trace)
            traces.append(trace)
        return traces

    def note(
        self,
        key: Key,
        origin: str,
        kind: str,
        event_id: str | None,
        status: int | None,
        reason: int | None,
        made_at: datetime | None,
        decision: str,
        why: str,
    ) -> None:
        """A line of history, next in the address's learning order."""
        seq = self.states[key].next_seq()
        self.history.append(
            HistoryRow(key, seq, origin, kind, event_id, status, reason, made_at, decision, why)
        )

    def note_bridge(
        self, key: Key, kind: str, decision: str, why: str, event_id: str | None = None
    ) -> None:
        """A line of history for what the bridge did about the address's winner."""
        winner = self.states[key].winner
        self.note(
            key, "bridge", kind, event_id, winner.status if winner else None, None,
            winner.stamp.at if winner else None, decision, why,
        )  # fmt: skip

    async def save(self) -> None:
        await save_states(self.conn, self.states, self.emails)
        if self.history:
            await self.conn.execute(
                _HISTORY_SQL,
                *as_columns(
                    [
                        (
                            *h.key,
                            h.seq,
                            h.origin,
                            h.kind,
                            h.event_id,
                            h.status,
                            h.reason,
                            h.made_at,
                            h.decision,
                            h.why,
                        )
                        for h in self.history
                    ],
                    12,
                ),
            )
        trace_updates = [(i, s) for st in self.states.values() for i, s in st.trace_updates.items()]
        if trace_updates:
            await self.conn.execute(_CLOSE_TRACES_SQL, *as_columns(trace_updates, 2))
        if self.writes:
            await self.conn.execute(
                _NEW_WRITES_SQL,
                *as_columns(
                    [
                        (
                            w.write_id,
                            *w.key,
                            w.status,
                            w.change_event_id,
                            w.target,
                            w.written_at,
                            "expected" if w.echoes else "done",
                        )
                        for w in self.writes
                    ],
                    9,
                ),
            )
        closed_writes = [(i, s) for st in self.states.values() for i, s in st.closed_writes.items()]
        if closed_writes:
            await self.conn.execute(_CLOSE_WRITES_SQL, *as_columns(closed_writes, 2))
        if self.dispatch:
            await self.conn.execute(
                _DISPATCH_SQL,
                *as_columns(
                    [
                        (d.exchange, d.routing_key, d.message_id, d.type, json.dumps(d.body))
                        for d in self.dispatch
                    ],
                    5,
                ),
            )


async def lock(conn: asyncpg.Connection, keys: Iterable[Key]) -> SyncBatch:
    """The states of ``keys`` (created where new), locked until the transaction ends."""
    rows = await conn.fetch(_LOCK_SQL, *as_columns(sorted(set(keys)), 3))
    states: dict[Key, SyncState] = {}
    emails: dict[Key, str] = {}
    tracing: list[Key] = []
    writing: list[Key] = []
    for row in rows:
        key = (row["app_id"], row["channel"], row["address"])
        states[key] = state_of(row)
        if row["email"] is not None:
            emails[key] = row["email"]
        if row["open_traces"]:
            tracing.append(key)
        if row["awaited_writes"]:
            writing.append(key)
    # Most addresses have neither: looked up only for those that have some.
    if tracing:
        for row in await conn.fetch(_TRACES_SQL, *as_columns(tracing, 3)):
            states[(row["app_id"], row["channel"], row["address"])].traces.append(
                OpenTrace(
                    row["id"],
                    row["status"],
                    row["made_at"],
                    row["sent_at"],
                    row["state"],
                    row["corrective"],
                )
            )
    if writing:
        for row in await conn.fetch(_WRITES_SQL, *as_columns(writing, 3)):
            states[(row["app_id"], row["channel"], row["address"])].writes.append(
                PendingWrite(str(row["write_id"]), row["status"], row["written_at"])
            )
    return SyncBatch(conn, states, emails)


async def save_states(
    conn: asyncpg.Connection, states: dict[Key, SyncState], emails: dict[Key, str]
) -> None:
    rows = []
    for key, state in sorted(states.items()):
        winner, edrone, shop = state.winner, state.edrone, state.shop
        rows.append(
            (
                *key,
                state.seq,
                winner.side if winner else None,
                winner.status if winner else None,
                winner.stamp.at if winner else None,
                winner.stamp.seq if winner else None,
                winner.stamp.whole_seconds if winner else False,
                winner.event_id if winner else None,
                edrone is not None,
                edrone.status if edrone else None,
                edrone.stamp.at if edrone else None,
                edrone.stamp.seq if edrone else None,
                edrone.stamp.whole_seconds if edrone else False,
                shop is not None,
                shop.status if shop else None,
                shop.stamp.at if shop else None,
                shop.stamp.seq if shop else None,
                emails.get(key),
                len(state.traces),
                len(state.writes),
                state.edrone_second,
                state.edrone_seen,
                winner.floor if winner else None,
            )
        )
    if rows:
        await conn.execute(_SAVE_SQL, *as_columns(rows, 25))


async def unseen(
    conn: asyncpg.Connection, events: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Of the shop's (app_id, event_id), the ones never read before (now marked read)."""
    if not events:
        return set()
    rows = await conn.fetch(_SEEN_SQL, *as_columns(sorted(set(events)), 2))
    return {(row["app_id"], row["event_id"]) for row in rows}


def state_of(row: asyncpg.Record) -> SyncState:
    """A ``sync_state`` row as the rule's state (without its open traces and writes)."""
    state = SyncState(
        seq=row["seq"], edrone_second=row["edrone_second"], edrone_seen=row["edrone_seen"]
    )
    if row["side"] is not None:
        state.winner = Winner(
            row["status"],
            Stamp(row["made_at"], row["made_seq"], row["whole_seconds"]),
            row["side"],
            row["event_id"],
            row["made_floor"],
        )
    if row["edrone_known"]:
        state.edrone = Held(
            row["edrone_status"], Stamp(row["edrone_at"], row["edrone_seq"], row["edrone_whole"])
        )
    if row["shop_known"]:
        state.shop = Held(row["shop_status"], Stamp(row["shop_at"], row["shop_seq"]))
    return state


def as_columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as the column lists ``unnest`` takes."""
    return [[row[i] for row in rows] for i in range(width)]
