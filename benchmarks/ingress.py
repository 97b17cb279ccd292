"""Ingress: accepted webhooks/s from the real ``edrone-bridge ingress`` process under the
load generator, beside raw confirmed publishing at the same concurrency and a bare aiohttp
server under the same generator; the three interleaved, repeat by repeat."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from pamqp.commands import Basic

from benchmarks import deployment as d
from benchmarks.loadgen import LoadGenerator, Result
from benchmarks.report import Row, Target, cores_note, median
from benchmarks.worker import Worker, ping
from bridge.amqp import ROUTING_KEY_BY_CHANNEL, topology
from bridge.app_config import AppConfig
from bridge.config import Settings
from bridge.devtools.simulate import build_webhook
from bridge.ingress.webhook import verify_webhook

PATH = "/update_subscriber_status"


@dataclass
class IngressFigures:
    ingress: list[float] = field(default_factory=list)
    raw_publish: list[float] = field(default_factory=list)
    bare_http: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    # Per run kind, per repeat: cores used by each process group and by the whole machine.
    cpu: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"ingress": [], "raw": [], "bare": []}
    )

    @property
    def max_rate(self) -> float:
        ordered = sorted(self.ingress)
        return ordered[len(ordered) // 2] if ordered else 0.0


def published_body() -> bytes:
    """What the ingress publishes for one NATIVE_5 webhook: the raw baseline sends the same."""
    fields = build_webhook("NATIVE_5", d.APP_ID, d.SECRET)
    apps = {d.APP_ID: AppConfig(secret=d.SECRET)}
    message, _ = verify_webhook(fields, {}, apps, datetime.now(UTC))
    return message.model_dump_json().encode()


async def raw_publish(amqp_url: str, exchange_name: str, count: int, concurrency: int) -> float:
    """Persistent, mandatory, confirmed publishes with ``concurrency`` in flight; messages/s."""
    body = published_body()
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name)
        routing_key = ROUTING_KEY_BY_CHANNEL["email"]
        tag = uuid.uuid4().hex[:8]
        numbers = iter(range(count))
        failed = 0

        async def publisher() -> None:
            nonlocal failed
            for number in numbers:
                message = aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=f"raw-{tag}-{number}",
                    timestamp=datetime.now(UTC),
                )
                confirmation = await exchange.publish(
                    message, routing_key, mandatory=True, timeout=10
                )
                if not isinstance(confirmation, Basic.Ack):
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return (count - failed) / elapsed


async def _load(
    generator: LoadGenerator, port: int, count: int, concurrency: int, tag: str
) -> Result:
    await generator.prepare(
        host="127.0.0.1",
        port=port,
        path=PATH,
        count=count,
        tag=tag,
        app_id=d.APP_ID,
        secret=d.SECRET,
    )
    return await generator.closed(host="127.0.0.1", port=port, concurrency=concurrency)


def ingress_environment(settings: Settings, workers: int) -> dict[str, str]:
    extra = {"EDRONE_BRIDGE_INGRESS_WORKERS": str(workers)} if workers > 1 else {}
    return d.environment(settings, **extra)


@dataclass
class Setup:
    settings: Settings
    bare_port: int
    requests: int
    concurrency: int
    generator: LoadGenerator
    publisher: Worker
    groups: dict[str, dict[str, list[int]]]


async def _repeat(setup: Setup, repeat: int, figures: IngressFigures) -> None:
    """One bare run, one raw publish run, one ingress run, each with its CPU accounted."""
    settings, requests = setup.settings, setup.requests
    tag = f"ing-{repeat}-{uuid.uuid4().hex[:6]}"
    meter = d.CpuMeter(setup.groups["bare"])
    meter.start()
    result = await _load(setup.generator, setup.bare_port, requests, setup.concurrency, tag)
    figures.cpu["bare"].append(meter.stop())
    figures.bare_http.append(result.accepted_per_s)
    meter = d.CpuMeter(setup.groups["raw"])
    meter.start()
    figures.raw_publish.append(
        await setup.publisher.run(
            raw_publish,
            settings.amqp_url.get_secret_value(),
            topology(settings).webhook_exchange,
            requests,
            setup.concurrency,
        )
    )
    figures.cpu["raw"].append(meter.stop())
    await d.purge(settings, topology(settings).subscriptions_queue)
    meter = d.CpuMeter(setup.groups["ingress"])
    meter.start()
    result = await _load(setup.generator, settings.http_port, requests, setup.concurrency, tag)
    figures.cpu["ingress"].append(meter.stop())
    figures.ingress.append(result.accepted_per_s)
    if result.accepted != requests:
        figures.failures.append(f"repeat {repeat}: {dict(result.statuses)}")
    await d.purge(settings, topology(settings).subscriptions_queue)


async def run(
    *, repeats: int, requests: int, concurrency: int, workers: int, log_dir: Path
) -> tuple[list[Row], IngressFigures]:
    figures = IngressFigures()
    settings = d.make_settings("ingress", http_port=d.free_port())
    bare_port = d.free_port()
    async with d.deployment(settings, database=False):
        env = ingress_environment(settings, workers)
        ingress = d.start_child("ingress", d.bridge_command("ingress"), env, log_dir)
        bare_env = d.environment(settings)
        bare = d.start_child("bare-aiohttp", d.bare_command(bare_port), bare_env, log_dir)
        generator: LoadGenerator | None = None
        try:
            generator = LoadGenerator()
            with Worker() as publisher:
                await d.wait_http(f"http://127.0.0.1:{settings.http_port}/readyz", ingress)
                await d.wait_http(f"http://127.0.0.1:{bare_port}/readyz", bare)
                # One untimed round each, so that every run below finds warm processes.
                await _load(generator, settings.http_port, min(500, requests), concurrency, "warm")
                await _load(generator, bare_port, min(500, requests), concurrency, "warm")
                await d.purge(settings, topology(settings).subscriptions_queue)
                broker = d.pids_named("beam.smp")
                load = [generator.process.pid or 0]
                setup = Setup(
                    settings,
                    bare_port,
                    requests,
                    concurrency,
                    generator,
                    publisher,
                    groups={
                        "bare": {"server": [bare.pid], "generator": load},
                        "raw": {"publisher": [await publisher.run(ping)], "broker": broker},
                        "ingress": {"server": ingress.pids(), "broker": broker, "generator": load},
                    },
                )
                for repeat in range(repeats):
                    await _repeat(setup, repeat, figures)
        finally:
            if generator is not None:
                generator.close()
            await d.stop_child(ingress)
            await d.stop_child(bare)
    return rows(figures, concurrency, workers, requests), figures


def per_message_us(figures: IngressFigures, run_name: str, group: str) -> list[float]:
    """CPU of one process group per message, µs, per repeat (its cores over the run's rate)."""
    rates = {"ingress": figures.ingress, "raw": figures.raw_publish, "bare": figures.bare_http}
    return [
        sample[group] / rate * 1e6 if rate else float("nan")
        for sample, rate in zip(figures.cpu[run_name], rates[run_name], strict=False)
    ]


def cpu_row(figures: IngressFigures) -> Row:
    """The ingress's CPU per accepted webhook beside its floor: a bare aiohttp answer plus a
    raw confirmed publish, each measured in the same repeat."""
    ingress = per_message_us(figures, "ingress", "server")
    floor = [
        bare + raw
        for bare, raw in zip(
            per_message_us(figures, "bare", "server"),
            per_message_us(figures, "raw", "publisher"),
            strict=False,
        )
    ]
    broker = per_message_us(figures, "ingress", "broker")
    raw_broker = per_message_us(figures, "raw", "broker")
    return Row(
        "ingress: CPU per accepted webhook",
        "us",
        ingress,
        baseline="bare aiohttp answer + raw confirmed publish",
        baseline_samples=floor,
        target=Target("≤ 1.5 x the floor", max_ratio=1.5),
        note=f"the broker's CPU per webhook: {median(broker):.0f} us under the ingress,"
        f" {median(raw_broker):.0f} us under raw publishing (one message per webhook)",
    )


def _cpu_note(figures: IngressFigures) -> str:
    """Cores each process group used (median over repeats), and CPU per message."""
    runs = (
        ("ingress", figures.ingress, "server"),
        ("raw", figures.raw_publish, "publisher"),
        ("bare", figures.bare_http, "server"),
    )
    notes = [
        cores_note(name, figures.cpu[name], rates, main, "message")
        for name, rates, main in runs
        if figures.cpu[name]
    ]
    return "CPU: " + "; ".join(notes)


def rows(figures: IngressFigures, concurrency: int, workers: int, requests: int) -> list[Row]:
    setup = f"{requests:,} signed NATIVE_5 webhooks per repeat, {concurrency} connections"
    if workers > 1:
        setup += f", {workers} ingress worker processes"
    if figures.failures:
        setup += "; NOT ALL ACCEPTED: " + "; ".join(figures.failures)
    return [
        Row(
            "ingress: accepted webhooks/s",
            "/s",
            figures.ingress,
            baseline="raw confirmed publish",
            baseline_samples=figures.raw_publish,
            target=Target("≥ 0.6 x raw publish", min_ratio=0.6),
            note=setup,
        ),
        cpu_row(figures),
        Row(
            "ingress vs bare aiohttp 200",
            "/s",
            figures.ingress,
            baseline="bare aiohttp",
            baseline_samples=figures.bare_http,
            note=_cpu_note(figures),
        ),
    ]


def summary(figures: IngressFigures) -> dict[str, Any]:
    return {"max_rate": figures.max_rate}
