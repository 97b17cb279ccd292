"""Trace forwarder: traces/s to fake-edrone (its own process, 20 ms added latency) with the rate
limit off, beside a bare aiohttp client POST loop at the same concurrency; then, with the limit
at 100/s, the rate and the busiest one-second window as the fake received them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aio_pika
import aiohttp

from benchmarks import deployment as d
from benchmarks.report import Row, Target, cores_note
from benchmarks.worker import Worker, ping
from bridge.amqp import topology
from bridge.broker import connect
from bridge.config import Settings
from bridge.db import create_pool
from consumers import traces
from consumers.service import consumer_of
from consumers.trace_form import trace_form
from consumers.trace_plan import TraceCall

LATENCY_MS = 20
FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def shop_events(count: int, tag: str) -> list[bytes]:
    now = datetime.now(UTC).isoformat()
    return [
        json.dumps(
            {
                "event_id": f"{tag}-{i}",
                "occurred_at": now,
                "email": f"{tag}-{i}@example.com",
                "subscriber_status": 1,
                "app_id": d.APP_ID,
            }
        ).encode()
        for i in range(count)
    ]


async def preload(settings: Settings, count: int, tag: str) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.platform_exchange)
        pending = iter(shop_events(count, tag))

        async def publisher() -> None:
            for body in pending:
                message = aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await exchange.publish(message, settings.platform_routing_key, timeout=30)

        await asyncio.gather(*(publisher() for _ in range(128)))


async def forward(settings: Settings, expected: int, duration_s: float | None) -> dict[str, Any]:
    """The real forwarder, wired as ``consume traces`` wires it, until ``expected`` traces
    were sent (or for ``duration_s``); traces/s."""
    pool = await create_pool(settings, command_timeout_s=settings.traces.db_timeout_s)
    try:
        connection = await connect(settings, "bench traces")
        async with connection:
            built = consumer_of(traces.PART, settings, connection, pool)
            async with built as consumer, consumer:
                started = time.perf_counter()
                task = asyncio.create_task(consumer.run())
                limit_s = duration_s if duration_s is not None else 300.0
                counters = consumer.counters
                while counters.sent < expected and time.perf_counter() - started < limit_s:
                    if task.done():
                        raise RuntimeError(f"forwarder stopped early: {consumer!r}")
                    await asyncio.sleep(0.002)
                elapsed = time.perf_counter() - started
                await consumer.stop()
                await task
                return {
                    "elapsed_s": elapsed,
                    "sent": counters.sent,
                    "skipped": dict(counters.skipped),
                    "deferred": dict(counters.deferred),
                    "rate": counters.sent / elapsed,
                }
    finally:
        await pool.close()


async def bare_posts(url: str, count: int, concurrency: int) -> float:
    """aiohttp alone: ``concurrency`` tasks POSTing trace forms on one keep-alive session."""
    call = TraceCall(
        0, d.APP_ID, "a@example.com", datetime.now(UTC), email_known=True, email_status=1
    )
    settings = d.make_settings("form")
    form = trace_form(
        call, settings.apps[d.APP_ID], platform="x", platform_version="1", version="1"
    )
    numbers = iter(range(count))
    ok = 0
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=15),
        connector=aiohttp.TCPConnector(limit=concurrency),
    ) as session:

        async def poster() -> None:
            nonlocal ok
            for number in numbers:
                # The body built per request, as the forwarder builds it.
                fields = {**form, "email": f"bare-{number}@example.com"}
                body = urlencode(fields, doseq=True, encoding="utf-8").encode()
                async with session.post(url, data=body, headers=FORM_HEADERS) as response:
                    await response.text()
                    ok += 200 <= response.status < 300

        started = time.perf_counter()
        await asyncio.gather(*(poster() for _ in range(concurrency)))
        return ok / (time.perf_counter() - started)


async def fake_requests(base_url: str, since: int) -> tuple[list[float], int]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/requests", params={"since": str(since)}) as response,
    ):
        data = await response.json()
    return [r["received_monotonic"] for r in data["requests"]], int(data["next"])


async def clear_fake(base_url: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.delete(f"{base_url}/requests") as response,
    ):
        return int((await response.json())["next"])


def windows(times: list[float], limit: int = 100) -> tuple[float, int]:
    """(the sustained rate; the most requests in any window of one second that starts at a
    request). The rate is taken up to the first request of the last ``limit``: for requests
    sent ``limit`` at a time, once per window, as a sliding log sends them, that counts whole
    windows only, and it is exact for evenly spread ones too."""
    times = sorted(times)
    if len(times) <= 2 * limit:
        return 0.0, len(times)
    rate = (len(times) - limit) / (times[-limit] - times[0])
    busiest, k = 0, 0
    for i, first in enumerate(times):
        while k < len(times) and times[k] < first + 1.0:
            k += 1
        busiest = max(busiest, k - i)
    return rate, busiest


@dataclass
class TraceFigures:
    forwarder: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    limited_rate: list[float] = field(default_factory=list)
    limited_busiest: list[float] = field(default_factory=list)
    # The shortest time that held 101 requests at the fake: under 1 s means a window above 100.
    tightest_s: list[float] = field(default_factory=list)
    groups: dict[str, list[int]] = field(default_factory=dict)
    cpu: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"forwarder": [], "bare": []}
    )
    failures: list[str] = field(default_factory=list)

    def cpu_note(self) -> str:
        runs = (("forwarder", self.forwarder), ("bare", self.bare))
        notes = [
            cores_note(name, self.cpu[name], rates, "client", "trace")
            for name, rates in runs
            if self.cpu[name]
        ]
        return "CPU: " + "; ".join(notes)


async def run(*, repeats: int, traces: int, limited_s: float, log_dir: Path) -> list[Row]:
    port = d.free_port()
    base_url = f"http://127.0.0.1:{port}"
    unlimited = d.make_settings(
        "traces", trace_url=f"{base_url}/trace", traces={"rate_limit_per_s": 0}
    )
    figures = TraceFigures()
    concurrency = unlimited.traces.concurrency
    fake = d.start_child(
        "fake-edrone",
        d.bridge_command(
            "fake-edrone",
            "--port",
            str(port),
            "--latency-ms",
            str(LATENCY_MS),
            "--max-records",
            "200000",
        ),
        d.environment(unlimited, EDRONE_BRIDGE_LOG_LEVEL="warning"),
        log_dir,
    )
    limited = unlimited.model_copy(
        update={"traces": unlimited.traces.model_copy(update={"rate_limit_per_s": 100.0})}
    )
    try:
        await d.wait_http(f"{base_url}/healthz", fake)
        async with d.deployment(unlimited, traces=True):
            with Worker() as worker:
                figures.groups = {"client": [await worker.run(ping)], "fake": [fake.pid]}
                for repeat in range(repeats):
                    tag = f"tr{repeat}-{uuid.uuid4().hex[:6]}"
                    await _unlimited(worker, unlimited, traces, tag, figures)
                    await _limited(worker, limited, limited_s, tag, figures)
    finally:
        await d.stop_child(fake)
    return rows(figures, traces, concurrency, limited_s)


async def _unlimited(
    worker: Worker, settings: Settings, traces: int, tag: str, figures: TraceFigures
) -> None:
    base_url = settings.trace_url.removesuffix("/trace")
    await worker.run(preload, settings, traces, tag)
    meter = d.CpuMeter(figures.groups)
    meter.start()
    result = await worker.run(forward, settings, traces, None)
    figures.cpu["forwarder"].append(meter.stop())
    figures.forwarder.append(result["rate"])
    if result["sent"] != traces:
        figures.failures.append(str(result))
    meter.start()
    figures.bare.append(
        await worker.run(bare_posts, settings.trace_url, traces, settings.traces.concurrency)
    )
    figures.cpu["bare"].append(meter.stop())
    await clear_fake(base_url)


async def _limited(
    worker: Worker, settings: Settings, limited_s: float, tag: str, figures: TraceFigures
) -> None:
    base_url = settings.trace_url.removesuffix("/trace")
    # A backlog bigger than the run can send, so the limit alone sets the pace.
    backlog = int(100 * limited_s) + 300
    await worker.run(preload, settings, backlog, tag + "-lim")
    since = await clear_fake(base_url)
    await worker.run(forward, settings, backlog, limited_s)
    times, _ = await fake_requests(base_url, since)
    rate, busiest = windows(times)
    spans = [b - a for a, b in zip(sorted(times), sorted(times)[100:], strict=False)]
    figures.tightest_s.append(min(spans, default=float("nan")))
    figures.limited_rate.append(rate)
    figures.limited_busiest.append(float(busiest))
    await clear_fake(base_url)
    await d.purge(settings, topology(settings).traces_queue)


def rows(figures: TraceFigures, traces: int, concurrency: int, limited_s: float) -> list[Row]:
    note = (
        f"{traces:,} shop events per repeat, fake-edrone in its own process with"
        f" {LATENCY_MS} ms latency, concurrency {concurrency}"
    )
    note += "; " + figures.cpu_note()
    if figures.failures:
        note += "; NOT ALL SENT: " + "; ".join(figures.failures)
    return [
        Row(
            "traces: sent/s, no rate limit",
            "/s",
            figures.forwarder,
            baseline="bare aiohttp POSTs",
            baseline_samples=figures.bare,
            target=Target("≥ 0.8 x bare client", min_ratio=0.8),
            note=note,
        ),
        Row(
            "traces: rate at limit 100/s",
            "/s",
            figures.limited_rate,
            target=Target("95-100 /s", min_value=95, max_value=100),
            note=f"{limited_s:g} s per repeat, from the fake's received_monotonic times: requests"
            " up to the last 100 over the time they took",
        ),
        Row(
            "traces: busiest 1 s window at 100/s",
            "",
            figures.limited_busiest,
            target=Target("≤ 100 in every repeat", max_value=100),
            note="the most requests the fake received in any one-second window, worst repeat;"
            f" the closest 101 requests spanned {min(figures.tightest_s, default=0):.3f} s",
            aggregate="max",
        ),
    ]
