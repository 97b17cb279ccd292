"""RowLane: shop rows published to the forwarder's background lane, confirmed, one message per
row id, and never more than the lane's depth waiting in the broker."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from bridge.amqp import topology
from bridge.ops.row_lane import open_lane
from schemas.shop_row import SHOP_ROW_TYPE, ShopRow
from tests.support.apps import TEST_APP_ID
from tests.support.consumers import ready_count, take_all, wait_until

READ_AT = datetime(2026, 5, 1, 12, tzinfo=UTC)


def row(n: int, status: int | None = 1) -> ShopRow:
    return ShopRow(
        event_id=f"row-{n}",
        app_id=TEST_APP_ID,
        email=f"c{n}@example.com",
        subscriber_status=status,
        observed_at=READ_AT,
        run_id="run-1",
    )


async def test_rows_are_published_to_the_background_lane(settings, amqp_connection):
    """Each row once, as a persistent shop-row message named by its event_id; the same id
    twice in one send is one message."""
    rows = [row(1), row(2, 0), row(3, None)]
    async with open_lane(settings, "test lane", max_depth=100) as lane:
        assert lane.queue == topology(settings).backfill_queue
        await lane.send([*rows, rows[0]])
        assert await lane.depth() == 3
    taken = await take_all(amqp_connection, topology(settings).backfill_queue)
    assert [m.message_id for m in taken] == ["row-1", "row-2", "row-3"]
    assert {m.type for m in taken} == {SHOP_ROW_TYPE}
    assert [ShopRow.model_validate(json.loads(m.body)) for m in taken] == rows
    assert await ready_count(amqp_connection, topology(settings).traces_queue) == 0


async def test_nothing_to_send_publishes_nothing(settings, amqp_connection):
    async with open_lane(settings, "test lane", max_depth=10) as lane:
        await lane.send([])
    assert await ready_count(amqp_connection, topology(settings).backfill_queue) == 0


async def test_a_full_lane_holds_the_send_until_the_forwarder_makes_room(settings, amqp_connection):
    """With the lane at its depth, a send waits (publishing nothing) until messages are
    taken, then publishes: the broker never holds much more than the depth."""
    queue = topology(settings).backfill_queue
    async with open_lane(settings, "test lane", max_depth=2) as lane:
        lane._poll_s = 0.05
        await lane.send([row(1), row(2)])
        sending = asyncio.create_task(lane.send([row(3)]))
        await asyncio.sleep(0.3)
        assert not sending.done()
        assert await ready_count(amqp_connection, queue) == 2
        first = await take_all(amqp_connection, queue)
        async with asyncio.timeout(10):
            await sending
        assert lane.waited_s > 0
    taken = [m.message_id for m in first]
    # Room is made as the first is taken: the third may be published before the taking ends.
    if len(taken) < 3:
        await wait_until(lambda: ready_count(amqp_connection, queue))
        taken += [m.message_id for m in await take_all(amqp_connection, queue)]
    assert taken == ["row-1", "row-2", "row-3"]


async def test_a_page_larger_than_the_depth_is_sent_once_the_lane_is_empty(
    settings, amqp_connection
):
    async with open_lane(settings, "test lane", max_depth=1) as lane:
        await lane.send([row(1), row(2), row(3)])
    assert await ready_count(amqp_connection, topology(settings).backfill_queue) == 3
