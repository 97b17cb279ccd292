"""Dead-letter queue operations: read without removing, replay to the work queue (a message
leaves the DLQ only after its republish is confirmed), purge. The ``dlq`` commands' engine."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from bridge.amqp import Topology, delivery_limits, topology
from bridge.config import Settings
from bridge.headers import replay_headers
from bridge.ops.dlq_ages import released as _released
from bridge.ops.dlq_messages import DeadLetter, describe
from bridge.publishing import PublishFailed, copy_of, publish_confirmed

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0
# How long to wait for the next message the queue said it holds before giving up on it.
READ_WAIT_S = 5.0
# Reading without removing holds every message unacked, and the prefetch that allows it is a
# 16-bit count: list, show and the --id operations see at most this many messages.
MAX_HELD = 65_535


class DeadLetterError(Exception):
    """An operation that cannot go on; the message says why."""


class UnknownQueue(DeadLetterError):
    """A name that is not a dead-letter queue of this deployment."""


# What ends a replay early; nothing is lost, as every message not yet acked goes back to the DLQ.
_STOPS_A_REPLAY = (
    DeadLetterError,
    PublishFailed,
    AMQPError,
    ChannelInvalidStateError,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True)
class Listing:
    queue: str
    count: int  # messages the queue held when the read began
    messages: list[DeadLetter]


@dataclass
class Outcome:
    """What a replay or a purge did; ``failure`` says why it stopped early, if it did."""

    queue: str
    count: int = 0  # messages the queue held when the operation began
    read: int = 0
    done: Counter[str] = field(default_factory=Counter)  # per target queue (replay) or queue
    not_found: list[str] = field(default_factory=list)
    failure: str | None = None

    @property
    def total(self) -> int:
        return sum(self.done.values())


# --- names -----------------------------------------------------------------------------------


def resolve_queue(names: Topology, name: str) -> tuple[str, str]:
    """The dead-letter queue meant by ``name`` (its full name, or ``traces``, ``traces.dlq``)
    and its work queue; :class:`UnknownQueue` for anything else."""
    work_by_dlq = {names.dead_letter_queue(q): q for q in names.work_queues()}
    for candidate in (
        name,
        f"{names.prefix}.{name}",
        names.dead_letter_queue(f"{names.prefix}.{name}"),
    ):
        if candidate in work_by_dlq:
            return candidate, work_by_dlq[candidate]
    short = [q.removeprefix(f"{names.prefix}.") for q in names.work_queues()]
    raise UnknownQueue(
        f"{name!r} is not a dead-letter queue of this deployment (prefix {names.prefix!r}); "
        f"give one of {', '.join(short)} or {', '.join(work_by_dlq)}"
    )


# --- operations ------------------------------------------------------------------------------


async def list_messages(settings: Settings, queue: str, *, wait_s: float = READ_WAIT_S) -> Listing:
    """Every message of the DLQ, in queue order, left in place."""
    dlq, work_queue = resolve_queue(topology(settings), queue)
    limits = delivery_limits(settings)
    async with _opened(settings, dlq) as opened:
        deliveries = _deliveries(opened, min(opened.count, MAX_HELD), wait_s)
        messages = [describe(delivery, work_queue, limits) async for delivery in deliveries]
    return Listing(dlq, opened.count, messages)


async def find_message(
    settings: Settings, queue: str, message_id: str, *, wait_s: float = READ_WAIT_S
) -> DeadLetter | None:
    """The first message of the DLQ with this id, left in place; None if there is none."""
    dlq, work_queue = resolve_queue(topology(settings), queue)
    limits = delivery_limits(settings)
    async with (
        _opened(settings, dlq) as opened,
        aclosing(_deliveries(opened, min(opened.count, MAX_HELD), wait_s)) as deliveries,
    ):
        async for delivery in deliveries:
            dead = describe(delivery, work_queue, limits)
            if dead.id == message_id:
                return dead
    return None


async def replay(
    settings: Settings,
    queue: str,
    *,
    ids: Collection[str] | None,
    rate_per_s: float | None = None,
    wait_s: float = READ_WAIT_S,
) -> Outcome:
    """Republish the messages with these ids (None: all) to their work queue through the
    default exchange, persistent and with their failure headers reset, at most ``rate_per_s``
    a second; ack each one in the DLQ only after the broker confirmed its republish.

    Stops at the first message that could not be republished (it and the rest stay in the
    DLQ) and says why in ``failure``; a lost connection at worst leaves a duplicate."""
    names = topology(settings)
    dlq, work_queue = resolve_queue(names, queue)
    limits = delivery_limits(settings)
    outcome = Outcome(dlq)
    seen: set[str] = set()
    async with _opened(settings, dlq) as opened, _released(settings, dlq) as released:
        outcome.count = opened.count
        replayer = _Replayer(opened, names, settings, rate_per_s)
        # Acked as they go, so --all can move more than MAX_HELD messages.
        limit = opened.count if ids is None else min(opened.count, MAX_HELD)
        try:
            async with aclosing(_deliveries(opened, limit, wait_s)) as deliveries:
                async for delivery in deliveries:
                    outcome.read += 1
                    dead = describe(delivery, work_queue, limits)
                    if ids is None or dead.id in ids:
                        seen.add(dead.id)
                        outcome.done[await replayer.replay(delivery, dead)] += 1
                        await released.add(dead.id)
        except _STOPS_A_REPLAY as exc:
            outcome.failure = _why_stopped(exc, settings.publish_timeout_s)
            log.error(
                "dlq_replay_stopped", queue=dlq, replayed=outcome.total, error=outcome.failure
            )
    outcome.not_found = _missing(ids, seen)
    return outcome


async def purge(
    settings: Settings,
    queue: str,
    *,
    ids: Collection[str] | None,
    wait_s: float = READ_WAIT_S,
) -> Outcome:
    """Remove the messages with these ids (None: every message, by a queue purge)."""
    dlq, work_queue = resolve_queue(topology(settings), queue)
    limits = delivery_limits(settings)
    outcome = Outcome(dlq)
    seen: set[str] = set()
    async with _opened(settings, dlq) as opened, _released(settings, dlq) as released:
        outcome.count = opened.count
        if ids is None:
            before = await released.now()
            purged = await opened.queue.purge(timeout=settings.publish_timeout_s)
            outcome.done[dlq] = int(purged.message_count or 0)
            await released.forget(before)
        else:
            limit = min(opened.count, MAX_HELD)
            async with aclosing(_deliveries(opened, limit, wait_s)) as deliveries:
                async for delivery in deliveries:
                    outcome.read += 1
                    dead = describe(delivery, work_queue, limits)
                    if dead.id in ids:
                        await delivery.ack()
                        outcome.done[dlq] += 1
                        seen.add(dead.id)
                        await released.add(dead.id)
                        log.info("dlq_message_purged", queue=dlq, id=dead.id)
    outcome.not_found = _missing(ids, seen)
    return outcome


def _why_stopped(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, DeadLetterError):
        return str(exc)
    if isinstance(exc, PublishFailed) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, TimeoutError) or (isinstance(exc, PublishFailed) and exc.timed_out):
        # Maybe stored after all: the message stays in the DLQ and may be in both queues.
        return f"RabbitMQ did not confirm a republish within {timeout_s:g} s"
    return f"lost the channel to RabbitMQ ({type(exc).__name__})"


def _missing(ids: Collection[str] | None, seen: set[str]) -> list[str]:
    return [i for i in dict.fromkeys(ids or ()) if i not in seen]


# --- plumbing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Opened:
    connection: AbstractConnection
    channel: AbstractChannel
    queue: AbstractQueue
    count: int


@asynccontextmanager
async def _opened(settings: Settings, dlq: str) -> AsyncIterator[_Opened]:
    """A connection and a confirming channel on the DLQ, prefetch sized to hold all it counted.

    Closing them hands every delivery that was not acked back to the queue: that is how a read
    leaves messages in place, and how an interrupted replay keeps the ones not yet confirmed."""
    connection = await aio_pika.connect(
        settings.amqp_url.get_secret_value(),
        timeout=CONNECT_TIMEOUT_S,
        client_properties={"connection_name": "edrone-bridge dlq"},
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            queue = await channel.declare_queue(
                dlq, passive=True, timeout=settings.publish_timeout_s
            )
        except ChannelNotFoundEntity:
            raise DeadLetterError(
                f"queue {dlq} does not exist on this broker (its consumer declares it at start)"
            ) from None
        count = int(queue.declaration_result.message_count or 0)
        await channel.set_qos(
            prefetch_count=max(1, min(count, MAX_HELD)), timeout=settings.publish_timeout_s
        )
        yield _Opened(connection, channel, queue, count)


async def _deliveries(
    opened: _Opened, limit: int, wait_s: float
) -> AsyncGenerator[AbstractIncomingMessage, None]:
    """Up to ``limit`` deliveries, in queue order, each awaited at most ``wait_s``."""
    if limit < 1:
        return
    inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
    # None wakes the reader at once when the channel (or the connection) goes away.
    opened.channel.close_callbacks.add(lambda *_: inbox.put_nowait(None))
    await opened.queue.consume(inbox.put, timeout=wait_s)
    for read in range(limit):
        try:
            delivery = await asyncio.wait_for(inbox.get(), wait_s)
        except TimeoutError:
            # Fewer than counted: another reader holds some, or a consumer took them.
            log.warning("dlq_read_short", queue=opened.queue.name, expected=limit, read=read)
            return
        if delivery is None:
            raise DeadLetterError("lost the channel to RabbitMQ")
        yield delivery


def _replay_target(dead: DeadLetter, names: Topology) -> str:
    # The header comes with the message; only this deployment's work queues are trusted.
    if dead.original_queue not in names.work_queues():
        raise DeadLetterError(
            f"message {dead.id}: original queue {dead.original_queue!r} is not a work queue "
            "of this deployment"
        )
    return dead.original_queue


async def _require_queue(connection: AbstractConnection, name: str, timeout_s: float) -> None:
    """Fail early, and readably, when the target work queue does not exist."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(name, passive=True, timeout=timeout_s)
    except ChannelNotFoundEntity:
        raise DeadLetterError(
            f"work queue {name} does not exist (its consumer declares it at start)"
        ) from None
    finally:
        if not channel.is_closed:
            await channel.close()


class _Replayer:
    """Republishes DLQ deliveries to their work queues, paced, one confirmed copy at a time."""

    def __init__(
        self, opened: _Opened, names: Topology, settings: Settings, rate_per_s: float | None
    ) -> None:
        self._opened = opened
        self._names = names
        self._timeout_s = settings.publish_timeout_s
        self._pacer = _Pacer(rate_per_s)
        self._checked: set[str] = set()

    async def replay(self, delivery: AbstractIncomingMessage, dead: DeadLetter) -> str:
        """Republish, then ack the DLQ copy once the broker confirmed; the target queue."""
        target = _replay_target(dead, self._names)
        if target not in self._checked:
            await _require_queue(self._opened.connection, target, self._timeout_s)
            self._checked.add(target)
        await self._pacer.wait()
        # mandatory: a copy no queue took must come back as a failure, not vanish.
        message = copy_of(
            delivery, replay_headers(delivery.headers, datetime.now(UTC)), message_id=dead.id
        )
        try:
            await publish_confirmed(
                self._opened.channel.default_exchange, message, target, timeout_s=self._timeout_s
            )
        except PublishFailed as exc:
            if exc.refused is None:
                raise
            raise DeadLetterError(
                f"message {dead.id}: {target} did not take it ({exc.refused})"
            ) from None
        await delivery.ack()
        log.info("dlq_message_replayed", queue=target, id=dead.id)
        return target


class _Pacer:
    """Spaces successive ``wait()`` returns at least ``1 / rate_per_s`` apart."""

    def __init__(self, rate_per_s: float | None) -> None:
        self._interval_s = 1 / rate_per_s if rate_per_s else 0.0
        self._next_at = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
            now = self._next_at
        self._next_at = now + self._interval_s
