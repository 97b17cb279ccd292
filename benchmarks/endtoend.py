"""End to end and memory: the bridge as deployed (``ingress``, ``consume subscriptions``,
``consume traces`` and fake-edrone, each its own process) under an open-loop webhook load at half
the measured maximum ingress rate, plus a trickle of shop events for the trace forwarder.

Latency: webhook ``i`` is due at ``start + i / rate``; a poller asks the inbox every 2 ms for
the due event ids not yet seen, and an event's latency runs from its due time to the end of the
first poll that sees its row, i.e. after its transaction committed (an over-estimate by at most
one poll interval plus one query). Memory: every process's RSS, sampled each second; the peak is
the kernel's high-water mark (VmHWM), the slope a least-squares fit over the soak's second
half."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg

from benchmarks import deployment as d
from benchmarks.loadgen import LoadGenerator
from benchmarks.report import Row, Target, median
from bridge.config import Settings

POLL_INTERVAL_S = 0.002
PATH = "/update_subscriber_status"
SHOP_EVENTS_PER_S = 20
RSS_LIMIT_MB = 150.0
# "No growth": what is left after warm-up must stay under this.
SLOPE_LIMIT_MB_PER_MIN = 1.0


@dataclass
class Latencies:
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def percentile(values: list[float], percent: float) -> float:
    """Nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


async def poll_inbox(
    settings: Settings, tag: str, count: int, rate_per_s: float, start_at: float, timeout_s: float
) -> dict[str, float]:
    """event_id -> time.monotonic() at the end of the first poll that found its inbox row."""
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=10,
        server_settings={"search_path": f'"{settings.database_schema}"'},
    )
    seen: dict[str, float] = {}
    waiting: set[str] = set()
    next_index = 0
    try:
        deadline = start_at + count / rate_per_s + timeout_s
        while len(seen) < count and time.monotonic() < deadline:
            now = time.monotonic()
            due = min(count, int((now - start_at) * rate_per_s) + 1) if now >= start_at else 0
            while next_index < due:
                waiting.add(f"{tag}-{next_index:07d}")
                next_index += 1
            if waiting:
                rows = await conn.fetch(
                    "SELECT event_id FROM inbox WHERE app_id = $1 AND event_id = ANY($2::text[])",
                    d.APP_ID,
                    list(waiting),
                )
                found = time.monotonic()
                for row in rows:
                    seen[row["event_id"]] = found
                    waiting.discard(row["event_id"])
            await asyncio.sleep(POLL_INTERVAL_S)
    finally:
        await conn.close()
    return seen


async def feed_shop_events(settings: Settings, stop: asyncio.Event) -> int:
    """Shop events to the platform exchange at a steady trickle, until ``stop``."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    sent = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.platform_exchange)
        while not stop.is_set():
            body = {
                "event_id": f"soak-{uuid.uuid4().hex}",
                "occurred_at": datetime.now(UTC).isoformat(),
                "email": f"soak-{sent}@example.com",
                "subscriber_status": sent % 2,
                "app_id": d.APP_ID,
            }
            await exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json"),
                settings.platform_routing_key,
                timeout=10,
            )
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / SHOP_EVENTS_PER_S)
    return sent


async def measure_latency(
    generator: LoadGenerator, settings: Settings, rate_per_s: float, seconds: float, tag: str
) -> tuple[float, float, dict[str, int]]:
    count = max(10, int(rate_per_s * seconds))
    await generator.prepare(
        host="127.0.0.1",
        port=settings.http_port,
        path=PATH,
        count=count,
        tag=tag,
        app_id=d.APP_ID,
        secret=d.SECRET,
    )
    start_at = time.monotonic() + 0.5
    poller = asyncio.create_task(
        poll_inbox(settings, tag, count, rate_per_s, start_at, timeout_s=10.0)
    )
    result = await generator.open(
        host="127.0.0.1",
        port=settings.http_port,
        rate_per_s=rate_per_s,
        start_at=start_at,
        connections=64,
    )
    seen = await poller
    latencies = [
        (seen[event_id] - due) * 1000
        for event_id, (due, _) in result.sent.items()
        if event_id in seen
    ]
    missing = count - len(latencies)
    statuses = dict(result.statuses)
    if missing:
        statuses["not_in_inbox"] = missing
    return percentile(latencies, 50), percentile(latencies, 99), statuses


@dataclass
class Processes:
    children: list[d.Child] = field(default_factory=list)

    def add(self, child: d.Child) -> d.Child:
        self.children.append(child)
        return child

    async def stop(self) -> None:
        for child in reversed(self.children):
            await d.stop_child(child)


async def start_bridge(
    settings: Settings, workers: int, log_dir: Path, processes: Processes
) -> None:
    env = d.environment(settings)
    if workers > 1:
        env["EDRONE_BRIDGE_INGRESS_WORKERS"] = str(workers)
    fake_port = int(settings.trace_url.split(":")[2].split("/")[0])
    fake = processes.add(
        d.start_child(
            "fake-edrone",
            d.bridge_command("fake-edrone", "--port", str(fake_port), "--latency-ms", "20"),
            {**env, "EDRONE_BRIDGE_LOG_LEVEL": "warning"},
            log_dir,
        )
    )
    await d.wait_http(f"http://127.0.0.1:{fake_port}/healthz", fake)
    ports = {}
    for name, command in (
        ("subscriptions", ("consume", "subscriptions")),
        ("traces", ("consume", "traces")),
    ):
        ports[name] = d.free_port()
        processes.add(
            d.start_child(
                name,
                d.bridge_command(*command),
                {**env, "EDRONE_BRIDGE_METRICS_PORT": str(ports[name])},
                log_dir,
            )
        )
    ingress = processes.add(d.start_child("ingress", d.bridge_command("ingress"), env, log_dir))
    await d.wait_http(f"http://127.0.0.1:{settings.http_port}/readyz", ingress)
    for child, name in zip(processes.children[1:3], ("subscriptions", "traces"), strict=True):
        await d.wait_http(f"http://127.0.0.1:{ports[name]}/readyz", child)


async def run(
    *,
    repeats: int,
    rate_per_s: float,
    latency_s: float,
    soak_s: float,
    workers: int,
    log_dir: Path,
) -> list[Row]:
    fake_port = d.free_port()
    settings = d.make_settings(
        "e2e", http_port=d.free_port(), trace_url=f"http://127.0.0.1:{fake_port}/trace"
    )
    processes = Processes()
    latencies = Latencies()
    sampler = d.RssSampler(interval_s=1.0)
    generator = LoadGenerator()
    stop_feed = asyncio.Event()
    soak_start = 0.0
    try:
        async with d.deployment(settings, traces=True):
            await start_bridge(settings, workers, log_dir, processes)
            for child in processes.children:
                sampler.watch_child(child)
            sampler.start()
            feeder = asyncio.create_task(feed_shop_events(settings, stop_feed))
            for repeat in range(repeats):
                p50, p99, statuses = await measure_latency(
                    generator,
                    settings,
                    rate_per_s,
                    latency_s,
                    f"e2e{repeat}-{uuid.uuid4().hex[:6]}",
                )
                latencies.p50_ms.append(p50)
                latencies.p99_ms.append(p99)
                if set(statuses) != {"200"}:
                    latencies.rejected.append(str(statuses))
            soak_start = time.monotonic()
            soak = await generator.soak(
                build={
                    "host": "127.0.0.1",
                    "port": settings.http_port,
                    "path": PATH,
                    "count": int(rate_per_s * soak_s),
                    "tag": f"soak-{uuid.uuid4().hex[:6]}",
                    "app_id": d.APP_ID,
                    "secret": d.SECRET,
                },
                host="127.0.0.1",
                port=settings.http_port,
                rate_per_s=rate_per_s,
                start_at=time.monotonic() + 0.2,
                connections=64,
            )
            if soak.accepted != int(rate_per_s * soak_s):
                latencies.rejected.append(f"soak: {dict(soak.statuses)}")
            stop_feed.set()
            await feeder
            await sampler.stop()
    finally:
        stop_feed.set()
        generator.close()
        await processes.stop()
    return rows(settings, latencies, sampler, soak_start, rate_per_s, latency_s, soak_s)


def rows(
    settings: Settings,
    latencies: Latencies,
    sampler: d.RssSampler,
    soak_start: float,
    rate_per_s: float,
    latency_s: float,
    soak_s: float,
) -> list[Row]:
    flush_ms = settings.subscriptions.flush_interval_ms
    limit_ms = flush_ms + 25
    note = (
        f"{rate_per_s:,.0f} webhooks/s (half the measured maximum), {latency_s:g} s per repeat;"
        f" due time → first inbox poll (every {POLL_INTERVAL_S * 1000:g} ms) that sees the row"
    )
    if latencies.rejected:
        note += "; NOT ALL ACCEPTED/APPLIED: " + "; ".join(latencies.rejected)
    out = [
        Row("end to end: p50 webhook → ledger", "ms", latencies.p50_ms, note=note),
        Row(
            "end to end: p99 webhook → ledger",
            "ms",
            latencies.p99_ms,
            target=Target(f"≤ flush {flush_ms} + 25 = {limit_ms} ms", max_value=limit_ms),
        ),
    ]
    half = soak_start + soak_s / 2
    for name in sorted(sampler.samples):
        bridge_process = not name.startswith("fake-edrone")
        out.append(
            Row(
                f"memory: peak RSS {name}",
                "MB",
                [sampler.peaks.get(name, float("nan"))],
                target=Target(f"≤ {RSS_LIMIT_MB:g} MB", max_value=RSS_LIMIT_MB)
                if bridge_process
                else None,
            )
        )
        late = [(t, v) for t, v in sampler.samples[name] if t >= half]
        slope = d.slope_mb_per_min(late)
        first, last = (late[0][1], late[-1][1]) if late else (float("nan"), float("nan"))
        out.append(
            Row(
                f"memory: RSS slope {name}",
                "MB/min",
                [slope],
                target=Target(
                    f"≤ {SLOPE_LIMIT_MB_PER_MIN:g} MB/min", max_value=SLOPE_LIMIT_MB_PER_MIN
                )
                if bridge_process
                else None,
                note=f"over the last {soak_s / 2:g} s of a {soak_s:g} s soak: {first:.1f} →"
                f" {last:.1f} MB",
            )
        )
    return out


__all__ = ["median", "run"]
