"""The forwarder's two lanes against the real broker, PostgreSQL and fake-edrone over HTTP, run
as ``edrone-bridge consume traces`` (its own process, as deployed): shop rows waiting in the
background lane use what live changes leave of the rate limit, and live changes are sent as
promptly as without them."""

from __future__ import annotations

import asyncio
import bisect
import json
import statistics
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import aio_pika
import aiohttp
import pytest

from bridge.amqp import topology
from bridge.ops.row_lane import open_lane
from schemas.shop_row import ShopRow, row_event_id
from tests.support.apps import TEST_APP_ID
from tests.support.consumers import ready_count, shop_event, wait_until
from tests.support.processes import (
    BridgeProcess,
    accepted,
    bridge_env,
    free_port,
    report,
    wait_ready,
)

RATE_PER_S = 200
LIVE_PER_S = 30
WARM_UP_S = 8.0  # live alone: the latency without background load, and live's demand learnt
LOADED_S = 15.0  # live while rows wait in the background lane
ROWS = 3000


async def publish_live(
    connection: aio_pika.abc.AbstractConnection, settings, seconds: float, sent: dict[str, float]
) -> None:
    """Shop changes at LIVE_PER_S, each a new address, for ``seconds``; ``sent`` gets each
    address's publish time (monotonic), and every publish is confirmed before this returns."""
    channel = await connection.channel(publisher_confirms=True)
    async with channel:
        exchange = await channel.get_exchange(settings.platform_exchange)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        confirms = []
        for _ in range(round(seconds * LIVE_PER_S)):
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += 1 / LIVE_PER_S
            event = shop_event(f"live-{uuid.uuid4().hex[:12]}@example.com")
            message = aio_pika.Message(
                json.dumps(event).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event["event_id"],
            )
            sent[event["email"]] = time.monotonic()
            confirms.append(
                asyncio.create_task(
                    exchange.publish(message, settings.platform_routing_key, timeout=10)
                )
            )
        await asyncio.gather(*confirms)


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


async def live_rate_limit_waits(base_url: str) -> float:
    """Live trace calls that waited for the rate limit, from the process's /metrics."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"{base_url}/metrics") as response,
    ):
        text = await response.text()
    prefix = "edrone_bridge_rate_limit_waits_total"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@pytest.mark.timeout(180)
async def test_backfill_uses_what_live_leaves_without_slowing_live(
    fake, make_traces, amqp_connection, capsys, tmp_path
):
    """200 requests/s; live changes at 30/s, first alone for 8 s, then for 15 s while 3,000
    shop rows wait in the background lane. No live call waits for the rate limit, live latency
    (publish to edrone's receipt) stays as it was (p50 within 50 ms, p95 within 100 ms), the
    rows take at least 60 % of the 170/s live leaves, edrone never sees more than 200 requests
    in a one-second window, and every change and every row is sent once, none dead-lettered."""
    settings = await make_traces(rate_limit_per_s=RATE_PER_S)
    names = topology(settings)
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
        await publish_live(amqp_connection, settings, WARM_UP_S, alone)
        async with open_lane(settings, "test rows", max_depth=ROWS) as lane:
            await lane.send(rows)
        loaded_from = time.monotonic()
        await publish_live(amqp_connection, settings, LOADED_S, loaded)
        loaded_until = time.monotonic()
        rows_by_then = sum(1 for r in fake.requests if r.form["email"] in row_emails)
        await wait_until(lambda: len(accepted(fake)) >= ROWS + len(alone) + len(loaded), 60)
        work = [names.traces_queue, names.backfill_queue]
        parked = [q for w in work for q in names.parked_queues(w, settings.traces.retry_tiers_s)]

        async def drained() -> bool:
            return not any([await ready_count(amqp_connection, q) for q in work + parked])

        await wait_until(drained, 10)
        live_waits = await live_rate_limit_waits(base_url)
        assert await forwarder.terminate(30) == 0, forwarder.log_tail()
    finally:
        await forwarder.kill()

    received = {r.form["email"]: r.received_monotonic for r in fake.requests}
    latency_alone = [received[email] - at for email, at in alone.items()]
    latency_loaded = [received[email] - at for email, at in loaded.items()]
    rows_loaded = [
        r
        for r in fake.requests
        if r.form["email"] in row_emails and loaded_from <= r.received_monotonic < loaded_until
    ]
    rows_per_s = len(rows_loaded) / (loaded_until - loaded_from)
    times = sorted(r.received_monotonic for r in fake.requests)
    busiest = max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))
    report(
        capsys,
        "live and backfill lanes",
        p50_alone_ms=round(statistics.median(latency_alone) * 1000, 1),
        p50_loaded_ms=round(statistics.median(latency_loaded) * 1000, 1),
        p95_alone_ms=round(percentile(latency_alone, 95) * 1000, 1),
        p95_loaded_ms=round(percentile(latency_loaded, 95) * 1000, 1),
        rows_per_s=round(rows_per_s, 1),
        rows_by_end_of_live=rows_by_then,
        busiest_window=busiest,
        live_waits=live_waits,
    )
    # The rows outlasted the live traffic: the whole measure was under background load.
    assert rows_by_then < ROWS
    assert live_waits == 0
    assert statistics.median(latency_loaded) <= statistics.median(latency_alone) + 0.05
    assert percentile(latency_loaded, 95) <= percentile(latency_alone, 95) + 0.1
    assert rows_per_s >= 0.6 * (RATE_PER_S - LIVE_PER_S)
    assert busiest <= RATE_PER_S
    everyone = [*alone, *loaded, *row_emails]
    assert accepted(fake) == Counter(dict.fromkeys(everyone, 1))
    assert len(fake.requests) == len(everyone)
    for queue in (names.traces_queue, names.backfill_queue):
        assert await ready_count(amqp_connection, names.dead_letter_queue(queue)) == 0
