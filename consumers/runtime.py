"""The consumer runtime: micro-batches from one queue, ack after commit, in-process retries with
backoff and per-message dead-lettering; the handlers in ``consumers/`` supply only the work."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from types import TracebackType

import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractQueue,
    AbstractRobustChannel,
    ConsumerTag,
)

from bridge.amqp import Topology
from bridge.metrics import Metrics
from bridge.parked import Ledger
from bridge.part_settings import ConsumerOptions
from consumers.buffer import Buffer
from consumers.bundles import part_of_redelivered
from consumers.copies import CopyChannel, Parking, channel_open, publish_all
from consumers.isolation import BatchAttempts
from consumers.spec import ConsumerSpec, Counters, Delivery
from consumers.watchdog import Watchdog

log = structlog.get_logger(__name__)

# What a failed ack/cancel/close on a lost channel raises: aio-pika's and aiormq's errors,
# ConnectionError, RuntimeError (ChannelInvalidStateError), TimeoutError, and even the bare
# Exception class, with which aiormq fails whatever was pending when a channel closes without
# an error of its own. So any Exception; the broker redelivers whatever was not acked.
_CHANNEL_ERRORS = (Exception,)


class Consumer:
    """Consumes ``spec.queue`` in micro-batches and hands each batch to ``spec.handler``.

    One batch is handled at a time while the next one fills from the prefetch. A batch is acked
    with one ``ack(multiple=True)`` only after its handler returned (its transaction committed)
    and every rejected message's dead-letter copy was confirmed (docs/design.md promises 2 and 4).
    A handler failing for a reason about its service gets the same batch again after an
    exponential backoff; any other failure is narrowed down to the message that causes it,
    which alone is dead-lettered (:class:`consumers.isolation.BatchAttempts`, promise 7).
    Nothing is nacked, so the quorum queue's delivery limit counts only real redeliveries.

    Use as ``async with Consumer(connection, spec, options, ...) as consumer: await
    consumer.run()``; :meth:`stop` (from another task) ends :meth:`run` gracefully.

    :param connection: an open (preferably robust) connection; the consumer opens and closes
        its own channels on it but leaves the connection to the caller.
    :param options: every number of the runtime (batching, prefetch, backoffs, draining, the
        watchdog, the failure limit), from the consumer's settings group.
    :param topology: names the dead-letter exchange, the queue's dead-letter routing key and
        its retry tiers (``spec.retry_tiers_s``).
    :param publish_timeout_s: bound on each dead-letter confirm, on opening the channels and
        on each ack, cancel and close.
    :param ledger: where the ages of the copies it parks are kept (bridge/parked.py); None
        keeps none.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        spec: ConsumerSpec,
        options: ConsumerOptions,
        *,
        topology: Topology,
        publish_timeout_s: float,
        metrics: Metrics | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.spec = spec
        self.options = options
        self.queue_name = spec.queue
        self.flush_interval_s = options.flush_interval_ms / 1000
        self.publish_timeout_s = publish_timeout_s
        self.counters = Counters(queue=spec.queue, metrics=metrics)
        self._in_flight: list[Delivery] = []
        self._attempts = BatchAttempts(
            spec.handler,
            timeout_s=spec.timeout_s,
            initial_backoff_s=options.retry_initial_backoff_s,
            max_backoff_s=options.retry_max_backoff_s,
            max_failures=options.max_batch_failures,
            counters=self.counters,
            probe=spec.probe,
        )

        self._connection = connection
        self._topology = topology
        tiers = [(d, topology.retry_queue(spec.queue, d)) for d in spec.retry_tiers_s]
        self._copies = CopyChannel(connection, topology, spec.queue, tiers, publish_timeout_s)
        self._parking = Parking(ledger, topology.parked_queues(spec.queue, spec.retry_tiers_s))
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: ConsumerTag | None = None
        self._watchdog = Watchdog(
            spec.queue,
            options.watchdog_interval_s,
            publish_timeout_s,
            consuming=self._consuming,
            connected=connection.connected.is_set,
            register_again=self._register_again,
        )

        self._buffer = Buffer()
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._done.set()
        self._drain: asyncio.Timeout | None = None

    def __repr__(self) -> str:
        c = self.counters
        return (
            f"<Consumer queue={self.queue_name!r} applied={c.applied} sent={c.sent}"
            f" skipped={dict(c.skipped)} dead_lettered={c.dead_lettered}"
            f" deferred={dict(c.deferred)}"
            f" batches={c.batches} retries={c.retries} splits={c.splits} isolated={c.isolated}"
            f" dropped={c.dropped} reregistered={c.reregistered} buffered={len(self._buffer)}>"
        )

    @property
    def ready(self) -> bool:
        """Consuming: not stopping, the consume channel open (false at once while the broker
        is unreachable) and the broker delivering to our consumer tag at the last check."""
        channel = self._channel
        return (
            self._watchdog.registered
            and not self._stopping.is_set()
            and channel is not None
            and not channel.is_closed
        )

    async def __aenter__(self) -> Consumer:
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                await self._open()
        except BaseException:
            await self._close()
            raise
        self._watchdog.start()
        log.info(
            "consumer_started",
            queue=self.queue_name,
            batch_size=self.options.batch_size,
            flush_interval_s=self.flush_interval_s,
            prefetch=self.options.prefetch,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
        log.info("consumer_closed", queue=self.queue_name, **self.counters.summary())

    async def _open(self) -> None:
        self._channel = await self._connection.channel(publisher_confirms=False)
        await self._channel.set_qos(prefetch_count=self.options.prefetch)
        # Passive: declaring the topology is the process's job; a missing queue stops the start.
        self._queue = await self._channel.get_queue(self.queue_name, ensure=True)
        await self._copies.open()
        self._consumer_tag = await self._queue.consume(
            self._buffer.add, timeout=self.publish_timeout_s
        )
        # Closed (not ready until a look says so) or reopened by aio-pika (look at once).
        self._channel.close_callbacks.add(self._watchdog.poke)
        if isinstance(self._channel, AbstractRobustChannel):
            self._channel.reopen_callbacks.add(self._watchdog.poke)

    async def _close(self) -> None:
        for channel in (self._copies.channel, self._channel):
            # A robust channel that is closed only because the connection is down is closed
            # too: else aio-pika would reopen it once the connection is back.
            if channel is None:
                continue
            try:
                # Closing the consume channel hands unacked deliveries back to the broker.
                await asyncio.wait_for(channel.close(), self.publish_timeout_s)
            except _CHANNEL_ERRORS as exc:
                log.warning("channel_close_failed", queue=self.queue_name, error=repr(exc))

    async def run(self, *, burst: bool = False) -> None:
        """Handle batches until :meth:`stop`; with ``burst`` also return once the queue is idle."""
        if self._queue is None:
            raise RuntimeError("open the consumer first: async with Consumer(...) as consumer")
        self._done.clear()
        drain = asyncio.timeout(None)
        try:
            with structlog.contextvars.bound_contextvars(queue=self.queue_name):
                async with drain:
                    self._drain = drain
                    if self._stopping.is_set():
                        self._start_drain_clock()
                    while (batch := await self._next_batch(burst)) is not None:
                        await self._process(batch)
        except TimeoutError:
            if not drain.expired():
                raise
            # Unacked deliveries go back to the queue when the channel closes.
            log.warning(
                "consumer_drain_timeout",
                queue=self.queue_name,
                drain_timeout_s=self.options.drain_timeout_s,
                buffered=len(self._buffer),
            )
        finally:
            self._drain = None
            self._done.set()

    async def stop(self) -> None:
        """Stop consuming, let buffered batches commit and ack within ``drain_timeout_s``,
        then close the channels (the broker takes back whatever is still unacked)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._buffer.wake()
            self._start_drain_clock()
            await self._watchdog.stop()
            await self._cancel_consumer()
        try:
            # The drain clock ends run(); the extra second covers its own cleanup.
            async with asyncio.timeout(self.options.drain_timeout_s + 1.0):
                await self._done.wait()
        except TimeoutError:
            log.error("consumer_stop_timeout", queue=self.queue_name)
        await self._close()

    def _start_drain_clock(self) -> None:
        if self._drain is not None:
            self._drain.reschedule(asyncio.get_running_loop().time() + self.options.drain_timeout_s)

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is None or self._queue is None:
            return
        # aio-pika's own timeout bounds only the RPC: before it, a robust channel waits for a
        # lost connection to come back, however long that takes. With the channel down the
        # broker has already forgotten the consumer, so the call gets no time at all; it still
        # tells aio-pika not to restore the consumer (it forgets the tag before awaiting).
        lost = self._channel is None or self._channel.is_closed
        try:
            async with asyncio.timeout(0 if lost else self.publish_timeout_s):
                await self._queue.cancel(tag)
        except _CHANNEL_ERRORS as exc:
            if not lost:
                log.warning("consumer_cancel_failed", queue=self.queue_name, error=repr(exc))

    async def _consuming(self) -> bool:
        """The watchdog's look: does the broker deliver to our consumer tag on our channel?"""
        channel, tag = self._channel, self._consumer_tag
        if channel is None or tag is None or channel.is_closed:
            return False
        try:
            underlay = await channel.get_underlay_channel()
        except _CHANNEL_ERRORS:
            return False
        return isinstance(underlay, aiormq.Channel) and tag in underlay.consumers

    async def _register_again(self) -> bool:
        """The watchdog's remedy: fresh channels and a new consumer; the old tag is cancelled
        first, so that aio-pika cannot restore it beside the new one. Deliveries of the old
        channel are dropped (the broker redelivers them)."""
        await self._cancel_consumer()
        await self._close()
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                await self._open()
        except _CHANNEL_ERRORS as exc:
            log.warning("consumer_register_failed", queue=self.queue_name, error=repr(exc))
            return False
        self.counters.reregistered += 1
        log.info("consumer_registered_again", queue=self.queue_name)
        return True

    async def _next_batch(self, burst: bool) -> list[Delivery] | None:
        """The next batch: the first buffered message and whatever follows it within
        ``flush_interval_s``, up to ``batch_size``; ``None`` when it is time to return."""
        while not self._buffer:
            if self._stopping.is_set():
                return None
            idle_s = max(self.flush_interval_s, 0.05) if burst else None
            if not await self._buffer.wait_for(1, idle_s) and burst and await self._queue_is_idle():
                return None
        if not self._stopping.is_set():
            left_s = self._buffer.first_arrival + self.flush_interval_s - time.monotonic()
            await self._buffer.wait_for(self.options.batch_size, max(left_s, 0.0))
        return self._buffer.take(self.options.batch_size)

    async def _queue_is_idle(self) -> bool:
        assert self._queue is not None
        try:
            # Bounded as a whole: a robust channel waits for a lost connection to come back.
            async with asyncio.timeout(self.publish_timeout_s):
                declared = await self._queue.declare()
        except _CHANNEL_ERRORS as exc:
            log.warning("queue_check_failed", queue=self.queue_name, error=repr(exc))
            return False
        if declared.message_count:
            return False
        # Deliveries sent before the declare-ok may still be on their way to the callback.
        return not await self._buffer.wait_for(1, max(self.flush_interval_s, 0.05))

    def oldest_held_age_s(self) -> float | None:
        """Age of the oldest message this consumer holds, by its publish timestamp: on a FIFO
        queue, the queue's oldest message while it has a consumer. None when it holds none."""
        held = self._in_flight or self._buffer.deliveries
        stamp = held[0].timestamp if held else None
        if stamp is None:
            return None
        return max(
            0.0, (datetime.now(UTC) - stamp.replace(tzinfo=stamp.tzinfo or UTC)).total_seconds()
        )

    async def _process(self, batch: list[Delivery]) -> None:
        started = time.perf_counter()
        self._in_flight = batch
        try:
            await self._process_held(batch, started)
        finally:
            self._in_flight = []

    async def _process_held(self, batch: list[Delivery], started: float) -> None:
        # A redelivered bundle's parts go back alone, unhandled (consumers/bundles.py).
        alone = [delivery for delivery in batch if part_of_redelivered(delivery)]
        if alone:
            batch = [delivery for delivery in batch if not part_of_redelivered(delivery)]
            alone = self._live(alone)
        handled = await self._attempts.run(batch, self._live) if batch else None
        if handled is None and not alone:
            return
        batch, outcomes = handled if handled is not None else ([], [])
        if batch:
            self.counters.record(outcomes, time.perf_counter() - started)
        copies = self._copies.planner.plan(batch, outcomes) + self._copies.planner.alone(alone)
        batch = batch + alone
        if copies:
            parked = await publish_all(
                copies,
                self.counters,
                self.options.retry_initial_backoff_s,
                self.options.retry_max_backoff_s,
                self._copies.renew,
            )
            if parked is None:
                self.counters.dropped += len(batch)
                log.warning("deliveries_dropped", reason="channel_lost", count=len(batch))
                return
            await self._parking.record(parked)
        await self._ack(batch)
        await self._parking.forget_returned(batch)
        log.debug(
            "batch_done",
            size=len(batch),
            copies=len(copies),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def _live(self, batch: list[Delivery]) -> list[Delivery]:
        """The deliveries whose channel is still open: only those can still be acked."""
        live = [delivery for delivery in batch if channel_open(delivery)]
        lost = len(batch) - len(live)
        if lost:
            self.counters.dropped += lost
            log.warning("deliveries_dropped", reason="channel_lost", count=lost)
        return live

    async def _ack(self, batch: list[Delivery]) -> None:
        # Tags rise per channel and only this batch is unacked on it, so acking its last
        # delivery with multiple=True acks exactly the batch. A reconnect mid-batch leaves
        # deliveries of two channels; the lost channel's ones are redelivered by the broker.
        by_channel: dict[int, list[Delivery]] = {}
        for delivery in batch:
            by_channel.setdefault(_channel_id(delivery), []).append(delivery)
        for group in by_channel.values():
            # The highest tag: the parts sent back alone come after the handled ones.
            last = max(group, key=lambda delivery: delivery.delivery_tag or 0)
            try:
                async with asyncio.timeout(self.publish_timeout_s):
                    await last.ack(multiple=True)
            except _CHANNEL_ERRORS as exc:
                self.counters.dropped += len(group)
                log.warning("batch_ack_failed", size=len(group), error=repr(exc))


def _channel_id(delivery: Delivery) -> int:
    try:
        return id(delivery.channel)
    except RuntimeError:
        return 0
