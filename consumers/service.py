"""Any consumer process, from the part that describes it: each consumer module exports one
:class:`ConsumerPart`; :func:`serve` runs it until ``stopping`` is set (pool, connection,
topology, the consumers, its metrics server and its queue monitor, closed in reverse order), and
:func:`consumers_of` builds its consumers on a connection and pool the caller owns: one for its
queue, and one for its background lane if it has one (the trace forwarder's backfill)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from bridge.amqp import topology
from bridge.broker import connect
from bridge.config import Settings
from bridge.db import answers, close_pool, create_pool
from bridge.metrics import Metrics, Readiness, exposed
from bridge.migrate import wait_until_migrated
from bridge.monitor import monitor
from bridge.parked import Ledger
from bridge.part_settings import ConsumerOptions
from bridge.starting import Stopped, unless_stopped
from consumers.runtime import Consumer
from consumers.spec import ConsumerSpec, Handler

log = structlog.get_logger(__name__)

Declare = Callable[[AbstractChannel, Settings], Awaitable[object]]


@dataclass(frozen=True)
class Lanes:
    """A part's handlers: its queue's, and its background lane's if it has one; the two share
    what the factory holds (the trace forwarder's: edrone's rate limits and breaker)."""

    live: Handler
    background: Handler | None = None


# Builds a part's handlers from (connection, pool, settings, metrics) and holds what they need
# (an HTTP session, the dispatcher) until the block ends.
HandlerFactory = Callable[
    [AbstractConnection, asyncpg.Pool, Settings, Metrics | None],
    AbstractAsyncContextManager[Lanes],
]


def _no_tiers(settings: Settings) -> Sequence[float]:
    return ()


def _both_lanes(settings: Settings) -> tuple[bool, bool]:
    return True, True


@dataclass(frozen=True)
class BackgroundLane:
    """A second queue of a part, consumed beside its queue on the same connection and pool,
    with the same options and retry tiers (its own tier queues), for work that may wait."""

    queue: Callable[[Settings], str]
    timeout_s: Callable[[Settings], float]
    # Its runtime's numbers, where they differ from the part's.
    options: Callable[[Settings], ConsumerOptions] | None = None


@dataclass(frozen=True)
class ConsumerPart:
    """One consumer, described for :func:`serve` and :func:`consumer_of`; what depends on the
    deployment is read from the settings. Its dead-letter queue and its retry tiers are
    monitored beside its queue."""

    # The process ("consume subscriptions"); its broker connection is named after it.
    name: str
    queue: Callable[[Settings], str]
    # Declares what it consumes from: at start, and again by aio-pika after a reconnect.
    declare: Declare
    handler: HandlerFactory
    # Its settings group: every number of its runtime.
    options: Callable[[Settings], ConsumerOptions]
    # Bound on one handler call; past it the batch is retried.
    timeout_s: Callable[[Settings], float]
    # Bound on each statement of the pool serve creates for it.
    command_timeout_s: Callable[[Settings], float]
    # Bound on asking whether the database answers, after a batch failed (the probe).
    probe_timeout_s: Callable[[Settings], float]
    retry_tiers_s: Callable[[Settings], Sequence[float]] = _no_tiers
    # Consumed too when the handler factory yields a background handler.
    background: BackgroundLane | None = None
    # Which of its lanes this process consumes: (its queue, its background lane).
    lanes: Callable[[Settings], tuple[bool, bool]] = _both_lanes


async def serve(
    part: ConsumerPart,
    settings: Settings,
    stopping: asyncio.Event,
    *,
    connection: AbstractConnection | None = None,
    pool: asyncpg.Pool | None = None,
    metrics: Metrics | None = None,
    expose_metrics: bool = True,
    started: Callable[[Consumer], object] | None = None,
) -> None:
    """Run the part's consumer until ``stopping`` is set, then drain it and close what this
    call opened: a ``connection`` or ``pool`` passed in stays the caller's, open.

    ``expose_metrics`` serves ``/metrics``, ``/healthz`` and ``/readyz`` on
    ``settings.metrics_port``; ``run`` turns it off and exposes one registry on the ingress.
    ``started`` is called with each consumer, its queue's first, once everything is up (tests
    read their counters)."""
    metrics = metrics if metrics is not None else Metrics()
    try:
        async with AsyncExitStack() as opened:
            consumers = await _start(
                part, settings, stopping, opened, connection, pool, metrics, expose_metrics
            )
            for consumer in consumers if started is not None else ():
                started(consumer)
            await consume_all_until(consumers, stopping)
    except Stopped:
        log.info("stopped_before_serving", part=part.name)


async def _start(
    part: ConsumerPart,
    settings: Settings,
    stopping: asyncio.Event,
    opened: AsyncExitStack,
    connection: AbstractConnection | None,
    pool: asyncpg.Pool | None,
    metrics: Metrics,
    expose_metrics: bool,
) -> list[Consumer]:
    """Everything up to consuming, each step registered in ``opened`` to be closed in reverse
    order; a stop asked for meanwhile ends the start at once (:class:`Stopped`). ``/readyz``
    answers from the first step on, saying what the start waits for."""
    readiness = Readiness()
    if pool is None:
        pool = await create_pool(
            settings, command_timeout_s=part.command_timeout_s(settings), stopping=stopping
        )
        opened.push_async_callback(close_pool, pool, part.options(settings).drain_timeout_s)
    if expose_metrics:
        await opened.enter_async_context(exposed(settings, metrics, readiness, part.name))
    # Both services reached before waiting for the migrations: one that cannot be is named at
    # once, not after someone migrates.
    readiness.reason = "connecting to RabbitMQ"
    if connection is None:
        robust = await connect(settings, part.name, stopping=stopping)
        connection = await opened.enter_async_context(robust)
    await wait_until_migrated(pool, settings.database_schema, stopping, readiness.waiting)
    readiness.reason = "starting to consume"
    # The declaring channel stays open while consuming: aio-pika declares the topology
    # again on it after a reconnect, so a broker that came back without its queues and
    # exchanges gets them back before the consumer's channel is restored.
    channel = await opened.enter_async_context(connection.channel())
    await unless_stopped(part.declare(channel, settings), stopping)
    consumers = await opened.enter_async_context(
        consumers_of(part, settings, connection, pool, metrics=metrics)
    )
    for consumer in consumers:
        await unless_stopped(opened.enter_async_context(consumer), stopping)
    readiness.checks += [_connected(connection), *map(_consuming, consumers)]
    readiness.reason = None
    await opened.enter_async_context(_monitored(settings, metrics, connection, consumers, pool))
    return consumers


def _connected(connection: AbstractConnection) -> Callable[[], str | None]:
    return lambda: "the connection to RabbitMQ is down" if connection.is_closed else None


def _consuming(consumer: Consumer) -> Callable[[], str | None]:
    return lambda: None if consumer.ready else f"not consuming {consumer.queue_name}"


@asynccontextmanager
async def consumer_of(
    part: ConsumerPart,
    settings: Settings,
    connection: AbstractConnection,
    pool: asyncpg.Pool,
    *,
    metrics: Metrics | None = None,
) -> AsyncIterator[Consumer]:
    """The consumer of the part's queue, as :func:`consumers_of` builds it."""
    async with consumers_of(part, settings, connection, pool, metrics=metrics) as consumers:
        yield consumers[0]


@asynccontextmanager
async def consumers_of(
    part: ConsumerPart,
    settings: Settings,
    connection: AbstractConnection,
    pool: asyncpg.Pool,
    *,
    metrics: Metrics | None = None,
) -> AsyncIterator[list[Consumer]]:
    """The part's consumers on ``connection`` and ``pool`` (both the caller's), its queue's
    first, then its background lane's (those of ``part.lanes``); their handlers' resources
    held for the block. Not open
    yet: ``async with consumer`` opens its channels (the topology must be declared) and closes
    them, drained, before the block ends."""
    async with part.handler(connection, pool, settings, metrics) as lanes:
        options = part.options(settings)
        live, background = part.lanes(settings)
        lane_specs = []
        if live:
            lane_specs.append((part.queue(settings), lanes.live, part.timeout_s(settings), options))
        if background and part.background is not None and lanes.background is not None:
            lane = part.background
            lane_options = lane.options(settings) if lane.options is not None else options
            lane_specs.append(
                (lane.queue(settings), lanes.background, lane.timeout_s(settings), lane_options)
            )
        yield [
            Consumer(
                connection,
                ConsumerSpec(
                    queue,
                    handler,
                    timeout_s=timeout_s,
                    retry_tiers_s=part.retry_tiers_s(settings),
                    probe=functools.partial(answers, pool, part.probe_timeout_s(settings)),
                ),
                lane_options,
                topology=topology(settings),
                publish_timeout_s=settings.publish_timeout_s,
                metrics=metrics,
                ledger=Ledger(pool, timeout_s=part.probe_timeout_s(settings)),
            )
            for queue, handler, timeout_s, lane_options in lane_specs
        ]


async def consume_all_until(consumers: Sequence[Consumer], stopping: asyncio.Event) -> None:
    """Run every consumer until ``stopping`` is set; one that stops by itself or crashes stops
    the others, drained, and its error is re-raised once they have."""
    stop_all = asyncio.Event()

    async def consume(consumer: Consumer) -> None:
        try:
            await consume_until(consumer, stop_all)
        finally:
            stop_all.set()

    async def relay_stop() -> None:
        await stopping.wait()
        stop_all.set()

    relay = asyncio.create_task(relay_stop())
    try:
        ended = await asyncio.gather(*map(consume, consumers), return_exceptions=True)
    finally:
        relay.cancel()
    for result in ended:
        if isinstance(result, BaseException):
            raise result


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


@asynccontextmanager
async def _monitored(
    settings: Settings,
    metrics: Metrics,
    connection: AbstractConnection,
    consumers: Sequence[Consumer],
    pool: asyncpg.Pool,
) -> AsyncIterator[None]:
    names = topology(settings)
    task = asyncio.create_task(
        monitor(
            connection,
            metrics,
            work_queues={c.queue_name: c.oldest_held_age_s for c in consumers},
            parked_queues=[
                parked
                for c in consumers
                for parked in names.parked_queues(c.queue_name, c.spec.retry_tiers_s)
            ],
            pool=pool,
            interval_s=settings.monitor_interval_s,
        ),
        name=f"monitor {consumers[0].queue_name}",
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
