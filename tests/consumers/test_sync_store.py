"""The sync state's store against the real database: a new address's state is read from
edrone's ledger and inserted once decided; one created meanwhile by another transaction
makes the batch be decided again, never overwritten."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from bridge.config import Settings
from consumers import sync_store
from consumers.errors import RetryLater
from consumers.sync import Held, Stamp, Winner

KEY = ("app", "email", "new@example.com")
SEEDED = ("app", "email", "ledger@example.com")
AT = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


async def second_connection(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=10,
        server_settings={"search_path": f'"{settings.database_schema}", public'},
    )


def decide(batch: sync_store.SyncBatch, status: int) -> None:
    state = batch.states[KEY]
    state.winner = Winner(status, Stamp(AT, state.next_seq()), "shop", f"shop-{status}")
    state.shop = Held(status, state.winner.stamp)


async def test_a_new_state_is_inserted_once_decided(db: asyncpg.Connection) -> None:
    async with db.transaction():
        batch = await sync_store.lock(db, [KEY])
        assert batch.new == {KEY}
        assert batch.states[KEY].winner is None
        decide(batch, 0)
        await batch.save()
    row = await db.fetchrow("SELECT side, status, seq, shop_known FROM sync_state")
    assert dict(row) == {"side": "shop", "status": 0, "seq": 1, "shop_known": True}
    async with db.transaction():
        batch = await sync_store.lock(db, [KEY])
        assert batch.new == set()
        assert batch.states[KEY].winner.status == 0


async def test_a_new_state_starts_from_edrones_ledger(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO subscribers (app_id, channel, address, status, reason, event_id, "
        "event_date, ordered_at) VALUES ($1, $2, $3, 1, 10, 'w-1', $4, $4)",
        *SEEDED,
        AT,
    )
    async with db.transaction():
        batch = await sync_store.lock(db, [SEEDED])
        state = batch.states[SEEDED]
        assert batch.new == {SEEDED}
        assert (state.winner.side, state.winner.status, state.winner.event_id) == (
            "edrone",
            1,
            "w-1",
        )
        assert state.edrone.status == 1 and state.edrone_seen == 2
        await batch.save()
    assert await db.fetchval("SELECT count(*) FROM sync_state WHERE side = 'edrone'") == 1


async def test_a_state_created_meanwhile_is_never_overwritten(
    db: asyncpg.Connection, settings: Settings
) -> None:
    other = await second_connection(settings)
    try:
        tx = db.transaction()
        await tx.start()
        mine = await sync_store.lock(db, [KEY])
        decide(mine, 0)
        async with other.transaction():
            theirs = await sync_store.lock(other, [KEY])
            decide(theirs, 1)
            await theirs.save()
        with pytest.raises(RetryLater) as raised:
            await mine.save()
        assert raised.value.counts is False
        await tx.rollback()
    finally:
        await other.close()
    assert await db.fetchval("SELECT status FROM sync_state") == 1
    # Decided again, the batch finds the row and locks it.
    async with db.transaction():
        again = await sync_store.lock(db, [KEY])
        assert again.new == set() and again.states[KEY].winner.status == 1
