"""A consumer process: pool, connection, topology, the consumer itself (configured from its
settings group), its metrics server and its queue monitor, all closed in reverse order when
``stopping`` is set."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.amqp import Topology, connect
from bridge.config import ConsumerOptions, Settings
from bridge.db import close_pool, create_pool
from bridge.metrics import Metrics, observability_app, serving
from bridge.monitor import monitor
from consumers.isolation import Probe
from consumers.runtime import Consumer
from consumers.spec import ConsumerSpec, Handler

log = structlog.get_logger(__name__)

Declare = Callable[[AbstractChannel, Settings], Awaitable[object]]
Build = Callable[[AbstractConnection, asyncpg.Pool, Metrics], AbstractAsyncContextManager[Consumer]]


async def serve_consumer(
    settings: Settings,
    stopping: asyncio.Event,
    *,
    name: str,
    declare: Declare,
    build: Build,
    command_timeout_s: float,
    drain_timeout_s: float,
    metrics: Metrics | None,
    expose_metrics: bool,
    dead_letter_queues: Sequence[str] = (),
    other_queues: Sequence[str] = (),
) -> None:
    """Run one consumer until ``stopping`` is set, then drain it and close everything.

    ``expose_metrics`` serves ``/metrics``, ``/healthz`` and ``/readyz`` on
    ``settings.metrics_port``; ``run`` turns it off and exposes one registry on the ingress."""
    metrics = metrics if metrics is not None else Metrics()
    pool = await create_pool(settings, command_timeout_s=command_timeout_s)
    try:
        connection = await connect(settings, name)
        # The declaring channel stays open while consuming: aio-pika declares the topology
        # again on it after a reconnect, so a broker that came back without its queues and
        # exchanges gets them back before the consumer's channel is restored.
        async with connection, connection.channel() as channel:
            await declare(channel, settings)
            async with (
                build(connection, pool, metrics) as consumer,
                _exposed(settings, metrics, connection, consumer, expose_metrics),
                _monitored(
                    settings, metrics, connection, consumer, pool, dead_letter_queues, other_queues
                ),
            ):
                await consume_until(consumer, stopping)
    finally:
        await close_pool(pool, drain_timeout_s)


def create_consumer(
    connection: AbstractConnection,
    *,
    queue: str,
    handler: Handler,
    options: ConsumerOptions,
    topology: Topology,
    timeout_s: float,
    publish_timeout_s: float,
    retry_tiers_s: Sequence[float] = (),
    metrics: Metrics | None = None,
    probe: Probe | None = None,
) -> Consumer:
    """A consumer configured from one consumer's settings group; ``probe`` tells whether the
    handler's service answers (see :class:`consumers.isolation.BatchAttempts`)."""
    spec = ConsumerSpec(queue, handler, timeout_s, retry_tiers_s, probe)
    return Consumer(
        connection,
        spec,
        options,
        topology=topology,
        publish_timeout_s=publish_timeout_s,
        metrics=metrics,
    )


async def consume_until(consumer: Consumer, stopping: asyncio.Event) -> None:
    """Run ``consumer`` until ``stopping`` is set (or it stops by itself), then stop it."""
    run = asyncio.create_task(consumer.run(), name=f"consume {consumer.queue_name}")
    waiter = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
        await consumer.stop()
    except BaseException:
        run.cancel()
        raise
    finally:
        waiter.cancel()
    await run  # re-raises what crashed the run loop, if anything did


def _ready(connection: AbstractConnection, consumer: Consumer) -> Callable[[], bool]:
    def ready() -> bool:
        return not connection.is_closed and getattr(consumer, "ready", True)

    return ready


@asynccontextmanager
async def _exposed(
    settings: Settings,
    metrics: Metrics,
    connection: AbstractConnection,
    consumer: Consumer,
    expose: bool,
) -> AsyncIterator[None]:
    if not expose:
        yield
        return
    app = observability_app(metrics, _ready(connection, consumer))
    async with serving(app, settings.http_host, settings.metrics_port) as port:
        log.info("metrics_listening", port=port, queue=consumer.queue_name)
        yield


@asynccontextmanager
async def _monitored(
    settings: Settings,
    metrics: Metrics,
    connection: AbstractConnection,
    consumer: Consumer,
    pool: asyncpg.Pool,
    dead_letter_queues: Sequence[str],
    other_queues: Sequence[str],
) -> AsyncIterator[None]:
    task = asyncio.create_task(
        monitor(
            connection,
            metrics,
            work_queues={consumer.queue_name: consumer.oldest_held_age_s},
            dead_letter_queues=dead_letter_queues,
            other_queues=other_queues,
            pool=pool,
            interval_s=settings.monitor_interval_s,
        ),
        name=f"monitor {consumer.queue_name}",
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
