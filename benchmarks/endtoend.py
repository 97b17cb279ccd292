"""End to end and memory: the bridge as deployed (``ingress``, ``consume subscriptions``,
``consume traces`` and fake-edrone, each its own process) under an open-loop webhook load at half
the measured maximum ingress rate, plus a trickle of shop events for the trace forwarder.

Latency: webhook ``i`` is due at ``start + i / rate`` (the generator's clock), and its latency
runs to the moment a listener hears its inbox row committed: a row trigger, added only to the
benchmark's own schema, notifies the event_id, and PostgreSQL delivers notifications at commit.
Both are time.monotonic(), one clock for every process on the machine.

Memory: every process's RSS, sampled each second; the peak is the kernel's high-water mark
(VmHWM), the slope a least-squares fit over the soak's second half."""

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
from benchmarks.capacity import capacity_row
from benchmarks.loadgen import LoadGenerator
from benchmarks.report import Row, Target, median
from benchmarks.worker import Worker
from bridge.config import Settings

PATH = "/update_subscriber_status"
SHOP_EVENTS_PER_S = 20
RSS_LIMIT_MB = 150.0
# "No growth": what is left after warm-up must stay under this.
SLOPE_LIMIT_MB_PER_MIN = 1.0


@dataclass
class Latencies:
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    http_p50_ms: list[float] = field(default_factory=list)
    http_p99_ms: list[float] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    raw: list[dict[str, float]] = field(default_factory=list)
    # Cores each process group used during each measured run (deployment.CpuMeter).
    cpu: list[dict[str, float]] = field(default_factory=list)

    def add(
        self, p50: float, p99: float, http_p50: float, http_p99: float, statuses: dict[str, int]
    ) -> None:
        self.p50_ms.append(p50)
        self.p99_ms.append(p99)
        self.http_p50_ms.append(http_p50)
        self.http_p99_ms.append(http_p99)
        if set(statuses) != {"200"}:
            self.rejected.append(str(statuses))


def run_size(rate_per_s: float, seconds: float) -> int:
    """Webhooks (or raw messages) one open-loop run sends."""
    return max(10, int(rate_per_s * seconds))


def percentile(values: list[float], percent: float) -> float:
    """Nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


_NOTIFY_SQL = """
CREATE FUNCTION bench_inbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_inbox', NEW.event_id);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_inbox_notify AFTER INSERT ON inbox
    FOR EACH ROW EXECUTE FUNCTION bench_inbox_notify();
"""


class InboxWatcher:
    """When each event's inbox row was committed, as heard by a listener: a row trigger that
    exists only in the benchmark's schema notifies its event_id, and PostgreSQL delivers a
    notification when (and only if) its transaction commits."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._conn: asyncpg.Connection | None = None
        self.seen: dict[str, float] = {}

    async def start(self) -> None:
        schema = self._settings.database_schema
        self._conn = await asyncpg.connect(
            self._settings.database_url.get_secret_value(),
            timeout=10,
            server_settings={"search_path": f'"{schema}"'},
        )
        await self._conn.execute(_NOTIFY_SQL)
        await self._conn.add_listener(f"{schema}_inbox", self._heard)

    def _heard(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self.seen.setdefault(payload, time.monotonic())

    async def wait_for(self, event_ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # Polls a dict the listener fills: nothing to await but time.
        while time.monotonic() < deadline and not all(e in self.seen for e in event_ids):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def stop_listening(self) -> None:
        if self._conn is not None:
            await self._conn.remove_listener(f"{self._settings.database_schema}_inbox", self._heard)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


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
    generator: LoadGenerator,
    watcher: InboxWatcher,
    settings: Settings,
    rate_per_s: float,
    seconds: float,
    tag: str,
) -> tuple[float, float, float, float, dict[str, int]]:
    count = run_size(rate_per_s, seconds)
    await generator.prepare(
        host="127.0.0.1",
        port=settings.http_port,
        path=PATH,
        count=count,
        tag=tag,
        app_id=d.APP_ID,
        secret=d.SECRET,
    )
    result = await generator.open(
        host="127.0.0.1",
        port=settings.http_port,
        rate_per_s=rate_per_s,
        start_at=time.monotonic() + 0.5,
        connections=64,
    )
    await watcher.wait_for(list(result.sent), timeout_s=10.0)
    seen = watcher.seen
    latencies = [
        (seen[event_id] - due) * 1000
        for event_id, (due, _) in result.sent.items()
        if event_id in seen
    ]
    missing = count - len(latencies)
    statuses = dict(result.statuses)
    if missing:
        statuses["not_in_inbox"] = missing
    answers = [(done - due) * 1000 for due, done in result.sent.values()]
    return (
        percentile(latencies, 50),
        percentile(latencies, 99),
        percentile(answers, 50),
        percentile(answers, 99),
        statuses,
    )


async def raw_latency(amqp_url: str, queue_name: str, rate_per_s: float, seconds: float) -> dict:
    """The broker alone at the same rate: persistent confirmed publishes, open loop, to a quorum
    queue that a raw consumer drains; (due -> confirm, due -> delivered) percentiles in ms."""
    count = run_size(rate_per_s, seconds)
    confirmed: list[float] = []
    delivered: list[float] = []
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=2000)
        queue = await consume_channel.get_queue(queue_name)
        due_at: dict[str, float] = {}
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            delivered.append((time.monotonic() - due_at[message.message_id or ""]) * 1000)
            await message.ack()
            if len(delivered) >= count:
                done.set()

        await queue.consume(on_message)

        async def publish(number: int, due: float) -> None:
            message = aio_pika.Message(
                b"x" * 400, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(number)
            )
            await channel.default_exchange.publish(message, queue_name, timeout=10)
            confirmed.append((time.monotonic() - due) * 1000)

        start = time.monotonic() + 0.2
        tasks = set()
        for number in range(count):
            due = due_at[str(number)] = start + number / rate_per_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(publish(number, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*list(tasks))
        await asyncio.wait_for(done.wait(), 30)
    return {
        "confirm_p99": percentile(confirmed, 99),
        "delivered_p50": percentile(delivered, 50),
        "delivered_p99": percentile(delivered, 99),
    }


async def declare_raw_queue(settings: Settings, name: str) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


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
    latencies, quarter = Latencies(), Latencies()
    amqp_url = settings.amqp_url.get_secret_value()
    sampler = d.RssSampler(interval_s=1.0)
    generator = LoadGenerator()
    watcher = InboxWatcher(settings)
    worker = Worker()
    stop_feed = asyncio.Event()
    soak_start = 0.0
    raw_queue = f"{settings.amqp_prefix}.rawlat"
    try:
        async with d.deployment(settings, traces=True, extra_queues=(raw_queue,)):
            try:
                await declare_raw_queue(settings, raw_queue)
                await watcher.start()
                await start_bridge(settings, workers, log_dir, processes)
                for child in processes.children:
                    sampler.watch_child(child)
                fake, subscriptions, traces, ingress = processes.children
                groups = {
                    "ingress": ingress.pids(),
                    "broker": d.pids_named("beam.smp"),
                    "subscriptions": [subscriptions.pid],
                    "postgres": d.pids_named("postgres"),
                    "traces": [traces.pid, fake.pid],
                    "load": [generator.process.pid or 0],
                }
                sampler.start()
                feeder = asyncio.create_task(feed_shop_events(settings, stop_feed))
                for repeat in range(repeats):
                    # The rate under test, then half of it (the latency floor, for comparison).
                    for share, found in ((1.0, latencies), (0.5, quarter)):
                        rate = rate_per_s * share
                        found.raw.append(
                            await worker.run(raw_latency, amqp_url, raw_queue, rate, latency_s)
                        )
                        tag = f"e2e{repeat}-{share:g}-{uuid.uuid4().hex[:6]}"
                        meter = d.CpuMeter(groups)
                        meter.start()
                        found.add(
                            *await measure_latency(
                                generator, watcher, settings, rate, latency_s, tag
                            )
                        )
                        cores = meter.stop()
                        # CPU seconds per webhook sent, µs: the span holds more than the sending.
                        sent = run_size(rate, latency_s)
                        found.cpu.append(
                            {name: c * meter.wall_s / sent * 1e6 for name, c in cores.items()}
                            | {"machine_cores": cores["machine"]}
                        )
                await watcher.stop_listening()
                soak_start = time.monotonic()
                await _soak(generator, settings, rate_per_s, soak_s, latencies)
                stop_feed.set()
                await feeder
                await sampler.stop()
            finally:
                stop_feed.set()
                await processes.stop()
                await watcher.close()
    finally:
        generator.close()
        worker.close()
    return [
        *latency_rows(settings, latencies, quarter, rate_per_s, latency_s),
        capacity_row(latencies.cpu, rate_per_s, "at half the maximum"),
        capacity_row(quarter.cpu, rate_per_s / 2, "at a quarter of it"),
        *memory_rows(sampler, soak_start, soak_s),
    ]


async def _soak(
    generator: LoadGenerator,
    settings: Settings,
    rate_per_s: float,
    soak_s: float,
    latencies: Latencies,
) -> None:
    count = int(rate_per_s * soak_s)
    soak = await generator.soak(
        build={
            "host": "127.0.0.1",
            "port": settings.http_port,
            "path": PATH,
            "count": count,
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
    if soak.accepted != count:
        latencies.rejected.append(f"soak: {dict(soak.statuses)}")


def latency_rows(
    settings: Settings,
    latencies: Latencies,
    quarter: Latencies,
    rate_per_s: float,
    latency_s: float,
) -> list[Row]:
    flush_ms = settings.subscriptions.flush_interval_ms
    limit_ms = flush_ms + 25
    note = (
        f"{rate_per_s:,.0f} webhooks/s (half the measured maximum), {latency_s:g} s per repeat;"
        " due time → commit of its inbox row (heard by LISTEN on a row trigger's NOTIFY);"
        f" the ingress's own answer took p50 {median(latencies.http_p50_ms):.1f} ms, p99"
        f" {median(latencies.http_p99_ms):.1f} ms"
    )
    if latencies.rejected or quarter.rejected:
        note += "; NOT ALL ACCEPTED/APPLIED: " + "; ".join(latencies.rejected + quarter.rejected)
    return [
        Row("end to end: p50 webhook → ledger", "ms", latencies.p50_ms, note=note),
        Row(
            "end to end: p99 webhook → ledger",
            "ms",
            latencies.p99_ms,
            baseline="broker alone p99",
            baseline_samples=[r["delivered_p99"] for r in latencies.raw],
            target=Target("≤ 3 x the broker alone", max_ratio=3.0),
            note="baseline: the broker alone at the same rate, just before each repeat (raw"
            " confirmed publishes, open loop, to a quorum queue a raw consumer drains), due time"
            f" → delivered; its confirm p99 {_raw(latencies, 'confirm_p99'):.1f} ms",
        ),
        Row(
            "end to end: p99 at a quarter of max",
            "ms",
            quarter.p99_ms,
            baseline="broker alone p99",
            baseline_samples=[r["delivered_p99"] for r in quarter.raw],
            target=Target(f"≤ flush {flush_ms} + 25 = {limit_ms} ms", max_value=limit_ms),
            note=f"{rate_per_s / 2:,.0f} webhooks/s, for comparison: p50"
            f" {median(quarter.p50_ms):.1f} ms; the ingress's answer p99"
            f" {median(quarter.http_p99_ms):.1f} ms",
        ),
    ]


def _raw(latencies: Latencies, key: str) -> float:
    return median([r[key] for r in latencies.raw])


def memory_rows(sampler: d.RssSampler, soak_start: float, soak_s: float) -> list[Row]:
    out = []
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
