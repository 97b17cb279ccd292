"""The forwarder's two lanes against the real broker, PostgreSQL and fake-edrone over HTTP, run
as ``edrone-bridge consume traces`` (its own process, as deployed): shop rows waiting in the
background lane use what live changes leave of the rate limit, and live changes are sent as
promptly as without them."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import pytest

from bridge.amqp import declare_trace_topology, topology
from bridge.ops.row_lane import open_lane
from schemas.shop_row import ShopRow, row_event_id
from tests.support.apps import TEST_APP_ID
from tests.support.consumers import TRACE_FAST, ready_count
from tests.support.lanes import (
    FakeEdroneProcess,
    Latency,
    busiest_window,
    live_rate_limit_waits,
    publish_live,
    wait_drained,
)
from tests.support.processes import BridgeProcess, bridge_env, free_port, report, wait_ready

RATE_PER_S = 200
LIVE_PER_S = 30
WARM_UP_S = 8.0  # live alone: the latency without background load, and live's demand learnt
LOADED_S = 15.0  # live while rows wait in the background lane
ROWS = 3000


def shop_rows(count: int) -> list[ShopRow]:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    emails = [f"row{n:05d}@example.com" for n in range(count)]
    return [
        ShopRow(
            event_id=row_event_id(run_id, TEST_APP_ID, email, 1, None, None, None),
            app_id=TEST_APP_ID,
            email=email,
            subscriber_status=1,
            observed_at=now,
            run_id=run_id,
        )
        for email in emails
    ]


@pytest.mark.timeout(180)
async def test_backfill_uses_what_live_leaves_without_slowing_live(
    make_settings, db, amqp_connection, capsys, tmp_path
):
    """200 requests/s; live changes at 30/s, first alone for 8 s, then for 15 s while 3,000
    shop rows wait in the background lane, both lanes in one process (``consume traces``
    as it runs by default). No live call waits for the rate limit, live latency
    (publish to edrone's receipt) stays as it was (p50 within 50 ms, p95 within 100 ms), the
    rows take at least 60 % of the 170/s live leaves, edrone never sees more than 200 requests
    in a one-second window, and every change and every row is sent once, none dead-lettered."""
    async with FakeEdroneProcess(tmp_path / "fake.log", max_records=2 * ROWS) as fake:
        settings = make_settings(
            trace_url=fake.url, traces={**TRACE_FAST, "rate_limit_per_s": RATE_PER_S}
        )
        names = topology(settings)
        channel = await amqp_connection.channel()
        async with channel:
            await declare_trace_topology(channel, settings)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = bridge_env(
            settings,
            EDRONE_BRIDGE_TRACE_URL=fake.url,
            EDRONE_BRIDGE_METRICS_PORT=str(port),
            EDRONE_BRIDGE_TRACES__RATE_LIMIT_PER_S=str(RATE_PER_S),
            EDRONE_BRIDGE_TRACES__RETRY_TIERS_S="[0.2, 0.5]",
            EDRONE_BRIDGE_TRACES__FLUSH_INTERVAL_MS="10",
        )
        forwarder = BridgeProcess(tmp_path / "traces.log", "consume", "traces", env=env)
        rows = shop_rows(ROWS)
        row_emails = {row.email for row in rows}
        alone: dict[str, float] = {}
        loaded: dict[str, float] = {}
        try:
            await forwarder.start()
            await wait_ready(base_url)  # consuming both lanes
            await publish_live(amqp_connection, settings, WARM_UP_S, alone, per_s=LIVE_PER_S)
            async with open_lane(settings, "test rows", max_depth=ROWS) as lane:
                await lane.send(rows)
            loaded_from = time.monotonic()
            await publish_live(amqp_connection, settings, LOADED_S, loaded, per_s=LIVE_PER_S)
            loaded_until = time.monotonic()
            rows_by_then = await fake.count() - len(alone) - len(loaded)
            await fake.wait_for(ROWS + len(alone) + len(loaded), 60)
            await wait_drained(amqp_connection, settings, 10)
            live_waits = await live_rate_limit_waits(base_url)
            assert await forwarder.terminate(30) == 0, forwarder.log_tail()
        finally:
            await forwarder.kill()
        requests = await fake.requests()

    received = {r.form["email"]: r.received_monotonic for r in requests}
    latency = Latency.of(received, alone, loaded)
    rows_loaded = [
        r
        for r in requests
        if r.form["email"] in row_emails and loaded_from <= r.received_monotonic < loaded_until
    ]
    rows_per_s = len(rows_loaded) / (loaded_until - loaded_from)
    busiest = busiest_window(r.received_monotonic for r in requests)
    report(
        capsys,
        "live and backfill lanes, one process",
        **latency.figures(),
        rows_per_s=round(rows_per_s, 1),
        rows_by_end_of_live=rows_by_then,
        busiest_window=busiest,
        live_waits=live_waits,
    )
    # The rows outlasted the live traffic: the whole measure was under background load.
    assert rows_by_then < ROWS
    assert live_waits == 0
    p50_growth_s, p95_growth_s = latency.grew_by()
    assert p50_growth_s <= 0.05
    assert p95_growth_s <= 0.1
    assert rows_per_s >= 0.6 * (RATE_PER_S - LIVE_PER_S)
    assert busiest <= RATE_PER_S
    everyone_sent = [*alone, *loaded, *row_emails]
    sent = Counter(r.form["email"] for r in requests if r.status == 200)
    assert sent == Counter(dict.fromkeys(everyone_sent, 1))
    assert len(requests) == len(everyone_sent)
    for queue in (names.traces_queue, names.backfill_queue):
        assert await ready_count(amqp_connection, names.dead_letter_queue(queue)) == 0
