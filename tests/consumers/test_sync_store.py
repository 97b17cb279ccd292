"""The sync state's store against the real database: a new address's state starts from
edrone's ledger, and two transactions deciding the same new address take turns (the second
decides from the first's result, never over it)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from bridge.config import Settings
from consumers import sync_store
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


async def test_a_new_state_is_saved_as_decided(db: asyncpg.Connection) -> None:
    async with db.transaction():
        batch = await sync_store.lock(db, [KEY])
        assert batch.states[KEY].winner is None
        decide(batch, 0)
        await batch.save()
    row = await db.fetchrow("SELECT side, status, seq, shop_known FROM sync_state")
    assert dict(row) == {"side": "shop", "status": 0, "seq": 1, "shop_known": True}
    async with db.transaction():
        batch = await sync_store.lock(db, [KEY])
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
        assert (state.winner.side, state.winner.status, state.winner.event_id) == (
            "edrone",
            1,
            "w-1",
        )
        assert state.edrone.status == 1 and state.edrone_seen == 2
        await batch.save()
    assert await db.fetchval("SELECT count(*) FROM sync_state WHERE side = 'edrone'") == 1


async def test_a_new_address_decided_twice_at_once_takes_turns(
    db: asyncpg.Connection, settings: Settings
) -> None:
    """Two consumers (say the subscription consumer and the trace forwarder) read changes of
    the same new address at once: the second waits for the first's commit and starts from its
    decision."""
    other = await second_connection(settings)
    try:
        async with db.transaction():
            mine = await sync_store.lock(db, [KEY])
            decide(mine, 0)

            async def theirs() -> tuple[int | None, int]:
                async with other.transaction():
                    batch = await sync_store.lock(other, [KEY])
                    seen = batch.states[KEY].winner.status
                    decide(batch, 1)
                    await batch.save()
                    return seen, batch.states[KEY].seq

            waiting = asyncio.create_task(theirs())
            await asyncio.sleep(0.3)
            assert not waiting.done()  # the row is locked by the first
            await mine.save()
        seen, seq = await asyncio.wait_for(waiting, 10)
    finally:
        await other.close()
    assert seen == 0  # the second started from the first's decision
    row = await db.fetchrow("SELECT status, seq FROM sync_state")
    assert (row["status"], row["seq"]) == (1, seq) and seq == 2
