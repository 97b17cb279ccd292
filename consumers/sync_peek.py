"""The sync states of some addresses read without creating or locking them, for what-if
questions (``backfill --dry-run``): what the rule would decide of a row, on the states as they
are now. An address without a state reads as ``sync_store.lock`` would create it (from edrone's
ledger where it has a row). Open traces and awaited writes are not loaded: the rule for rows
does not look at them."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from consumers.sync import SyncState
from consumers.sync_store import Key, as_columns, state_of

# The second half mirrors sync_store._LOCK_SQL's new rows, built as sync_state records.
_PEEK_SQL = """
WITH k AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(app_id, channel, address)
)
SELECT s.* FROM sync_state AS s JOIN k USING (app_id, channel, address)
UNION ALL
SELECT (jsonb_populate_record(NULL::sync_state, jsonb_build_object(
    'app_id', k.app_id, 'channel', k.channel, 'address', k.address,
    'seq', CASE WHEN l.app_id IS NULL THEN 0 ELSE 1 END,
    'side', CASE WHEN l.app_id IS NULL THEN NULL ELSE 'edrone' END,
    'status', l.status, 'made_at', l.ordered_at,
    'made_seq', CASE WHEN l.app_id IS NULL THEN NULL ELSE 1 END,
    'whole_seconds', false, 'event_id', l.event_id, 'edrone_known', l.app_id IS NOT NULL,
    'edrone_status', l.status, 'edrone_at', l.ordered_at,
    'edrone_seq', CASE WHEN l.app_id IS NULL THEN NULL ELSE 1 END, 'edrone_whole', false,
    'edrone_second', date_trunc('second', l.ordered_at),
    'edrone_seen', CASE WHEN l.app_id IS NULL THEN 0 WHEN l.status = 0 THEN 1
                        WHEN l.status = 1 THEN 2 ELSE 4 END,
    'shop_known', false, 'open_traces', 0, 'awaited_writes', 0
))).*
FROM k LEFT JOIN subscribers AS l USING (app_id, channel, address)
WHERE NOT EXISTS (
    SELECT 1 FROM sync_state AS s
    WHERE s.app_id = k.app_id AND s.channel = k.channel AND s.address = k.address
)
"""


async def peek(
    conn: asyncpg.Connection | asyncpg.Pool, keys: Iterable[Key]
) -> tuple[dict[Key, SyncState], dict[Key, str]]:
    """The states of ``keys`` and the customers' e-mails they know, as stored; nothing
    written, nothing locked."""
    rows = await conn.fetch(_PEEK_SQL, *as_columns(sorted(set(keys)), 3))
    states, emails = {}, {}
    for row in rows:
        key = (row["app_id"], row["channel"], row["address"])
        states[key] = state_of(row)
        if row["email"] is not None:
            emails[key] = row["email"]
    return states, emails
