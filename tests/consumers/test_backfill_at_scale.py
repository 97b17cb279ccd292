"""A Magento-like table backfilled as deployed: ``edrone-bridge backfill``, ``consume traces
--lane live`` and ``consume traces --lane background`` each in its own process, sharing the
rate limit through PostgreSQL, against the real broker and fake-edrone (a process of its own
too) over HTTP, while live shop changes flow. Live changes go as promptly as without the
backfill, the backfill takes what they leave of the limit, edrone never sees more than the
limit in a second, and every row and every change is sent once.

The suite runs it on 20,000 rows (a minute and a half at this limit); the issue's 100,000 are
``EDRONE_BRIDGE_TEST_BACKFILL_ROWS=100000 pytest tests/consumers/test_backfill_at_scale.py``
(docs/testing.md)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import pytest

from bridge.amqp import declare_trace_topology, topology
from tests.support.apps import TEST_APP_ID
from tests.support.consumers import ready_count
from tests.support.lanes import (
    FakeEdroneProcess,
    Latency,
    busiest_window,
    live_rate_limit_waits,
    publish_live,
    wait_drained,
)
from tests.support.processes import BridgeProcess, bridge_env, free_port, report, wait_ready
from tests.support.shop_tables import MAGENTO_TABLE

ROWS = int(os.environ.get("EDRONE_BRIDGE_TEST_BACKFILL_ROWS", "20000"))
# Three times edrone's 100/s, so that the run is short; what the lane leaves is the same share.
RATE_PER_S = 300
LIVE_PER_S = 30
WARM_UP_S = 6.0  # live alone: its latency without the backfill, and its demand learnt
LOADED_S = 20.0  # live while the backfill runs
# How much live latency may grow under the backfill, the lanes in processes of their own: what
# CPU contention on 2 cores gives, with room for a noisy machine, and far below what a live
# change queued behind the backfill's rows would wait (seconds). Measured: p50 +1 ms and p95
# +6 ms on a quiet day; on a slower one (2026-12-08) p50 +9 to +10 ms and p95 +31 to +50 ms, the
# code of issue 13 alike. Whether the live lane ever waited for the limit is asserted exactly.
P50_GROWTH_S = 0.025
P95_GROWTH_S = 0.1
# Magento's statuses, a date per row: a third unsubscribed (3), the rest subscribed (1).
FILL_SQL = """
INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status, change_status_at)
SELECT 'm' || i || '@example.com', CASE WHEN i % 3 = 0 THEN 3 ELSE 1 END,
       timestamp '2024-01-01' + i * interval '1 second'
FROM generate_series(1, $1::int) AS i
"""
CONFIG = """
[apps.{app}.target]
table = "newsletter_subscriber"
address_column = "subscriber_email"
email_status_column = "subscriber_status"
email_status_values = {{ subscribed = 1, unsubscribed = 3 }}
set_now = ["change_status_at"]
changed_at_column = "change_status_at"
"""


@pytest.mark.timeout(900)
async def test_a_large_table_backfilled_beside_live_changes(
    make_settings, db, amqp_connection, capsys, tmp_path
):
    await db.execute(MAGENTO_TABLE)
    await db.execute(FILL_SQL, ROWS)
    config = tmp_path / "bridge.toml"
    config.write_text(CONFIG.format(app=TEST_APP_ID), encoding="utf-8")
    async with FakeEdroneProcess(tmp_path / "fake.log", max_records=ROWS * 2) as fake:
        settings = make_settings(trace_url=fake.url)
        names = topology(settings)
        channel = await amqp_connection.channel()
        async with channel:
            await declare_trace_topology(channel, settings)
        live_port, background_port = free_port(), free_port()
        env = bridge_env(
            settings,
            EDRONE_BRIDGE_CONFIG=str(config),
            EDRONE_BRIDGE_TRACE_URL=fake.url,
            EDRONE_BRIDGE_TRACES__RATE_LIMIT_PER_S=str(RATE_PER_S),
            EDRONE_BRIDGE_TRACES__RETRY_TIERS_S="[0.5, 2.0]",
            EDRONE_BRIDGE_TRACES__FLUSH_INTERVAL_MS="10",
        )
        live_lane = BridgeProcess(
            tmp_path / "live.log",
            *("consume", "traces", "--lane", "live"),
            env=env | {"EDRONE_BRIDGE_METRICS_PORT": str(live_port)},
        )
        background_lane = BridgeProcess(
            tmp_path / "background.log",
            *("consume", "traces", "--lane", "background"),
            env=env | {"EDRONE_BRIDGE_METRICS_PORT": str(background_port)},
        )
        backfill = BridgeProcess(
            tmp_path / "backfill.log", "backfill", "--app", TEST_APP_ID, env=env
        )
        alone: dict[str, float] = {}
        loaded: dict[str, float] = {}
        processes = (backfill, background_lane, live_lane)
        try:
            for lane, port in ((live_lane, live_port), (background_lane, background_port)):
                await lane.start()
                await wait_ready(f"http://127.0.0.1:{port}")
            await publish_live(amqp_connection, settings, WARM_UP_S, alone, per_s=LIVE_PER_S)
            await backfill.start()
            loaded_from = time.monotonic()
            await publish_live(amqp_connection, settings, LOADED_S, loaded, per_s=LIVE_PER_S)
            loaded_until = time.monotonic()
            rows_by_then = await fake.count() - len(alone) - len(loaded)
            await fake.wait_for(ROWS + len(alone) + len(loaded), ROWS / 200 + 120)
            # It ended by itself once every row was confirmed into the lane.
            assert backfill.process is not None
            assert await asyncio.wait_for(backfill.process.wait(), 60) == 0, backfill.log_tail()
            await wait_drained(amqp_connection, settings, 30)
            live_waits = await live_rate_limit_waits(f"http://127.0.0.1:{live_port}")
            for lane in (live_lane, background_lane):
                assert await lane.terminate(30) == 0, lane.log_tail()
        finally:
            for process in processes:
                await process.kill()
        requests = await fake.requests()

    received = {r.form["email"]: r.received_monotonic for r in requests}
    latency = Latency.of(received, alone, loaded)
    rows_loaded = sum(
        1
        for r in requests
        if r.form["email"].startswith("m") and loaded_from <= r.received_monotonic < loaded_until
    )
    rows_per_s = rows_loaded / (loaded_until - loaded_from)
    busiest = busiest_window(r.received_monotonic for r in requests)
    run = await db.fetchrow("SELECT * FROM backfill_runs")
    report(
        capsys,
        f"backfill of {ROWS:,} rows beside live changes, lanes apart",
        **latency.figures(),
        rows_per_s=round(rows_per_s, 1),
        rows_by_end_of_live=rows_by_then,
        busiest_window=busiest,
        live_waits=live_waits,
    )
    # The backfill outlasted the live traffic: the whole measure was under its load.
    assert rows_by_then < ROWS
    assert live_waits == 0
    p50_growth_s, p95_growth_s = latency.grew_by()
    assert p50_growth_s <= P50_GROWTH_S
    assert p95_growth_s <= P95_GROWTH_S
    assert rows_per_s >= 0.6 * (RATE_PER_S - LIVE_PER_S)
    # Over both processes: the limit is shared through the database.
    assert busiest <= RATE_PER_S
    # Every row once, with its status; every live change once; nothing else.
    sent = Counter(r.form["email"] for r in requests if r.status == 200)
    expected = {f"m{i}@example.com" for i in range(1, ROWS + 1)} | set(alone) | set(loaded)
    assert sent == Counter(dict.fromkeys(expected, 1))
    assert len(requests) == len(expected)
    statuses = {
        r.form["email"]: r.form["subscriber_status"]
        for r in requests
        if r.form["email"].startswith("m")
    }
    assert statuses["m3@example.com"] == "0" and statuses["m1@example.com"] == "1"
    assert Counter(statuses.values()) == {"1": ROWS - ROWS // 3, "0": ROWS // 3}
    assert run is not None and run["outcome"] == "finished"
    assert (run["rows_read"], run["queued"], run["invalid"]) == (ROWS, ROWS, 0)
    for queue in (names.traces_queue, names.backfill_queue):
        assert await ready_count(amqp_connection, names.dead_letter_queue(queue)) == 0
