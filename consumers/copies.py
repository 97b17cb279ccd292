"""What a batch's rejected and deferred messages become: confirmed copies in the dead-letter
queue or in a retry tier, all published before the runtime may ack the batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bridge.amqp import Topology
from bridge.headers import HEADER_PARKED_IN, attempts_so_far
from bridge.parked import Ledger, Parked, softly
from bridge.publishing import PublishFailed
from consumers.deadletter import AlonePublisher, DeadLetterPublisher, RetryPublisher
from consumers.outcomes import Defer, Reject
from consumers.spec import Counters

log = structlog.get_logger(__name__)


@dataclass(frozen=True, eq=False)
class Copy:
    """One confirmed copy to publish for ``delivery``: to a retry tier of ``tier_s`` seconds,
    or to the dead-letter queue when ``tier_s`` is None; or, ``alone``, a bundle's part back
    to its own queue as a message of its own (consumers/bundles.py), which parks nothing."""

    delivery: AbstractIncomingMessage
    publish: Callable[[], Awaitable[Parked | None]]
    tier_s: float | None
    alone: bool = False


class CopyPlanner:
    """Turns Reject and Defer outcomes into copies; a Defer past the last tier (or without
    tiers) becomes a dead letter that says how many attempts were made."""

    def __init__(
        self,
        dead_letters: DeadLetterPublisher,
        retries: RetryPublisher | None,
        alone: AlonePublisher,
    ) -> None:
        self._dead_letters = dead_letters
        self._retries = retries
        self._alone = alone

    def replace(self, planner: CopyPlanner) -> None:
        """Publish through ``planner``'s publishers (another channel's) from now on, the copies
        planned already included."""
        self._dead_letters, self._retries = planner._dead_letters, planner._retries
        self._alone = planner._alone

    def alone(self, parts: Sequence[AbstractIncomingMessage]) -> list[Copy]:
        """Each part of a redelivered bundle back to its queue, a message of its own."""
        copies = []
        for part in parts:

            async def publish(part: AbstractIncomingMessage = part) -> None:
                # The planner's publisher at the time of the publish: it may have been replaced.
                await self._alone.publish(part)

            copies.append(Copy(part, publish, None, alone=True))
        return copies

    def plan(
        self, batch: Sequence[AbstractIncomingMessage], outcomes: Sequence[object]
    ) -> list[Copy]:
        copies = []
        for delivery, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Defer):
                copies.append(self._retry(delivery, outcome))
            elif isinstance(outcome, Reject):
                copies.append(self._dead_letter(delivery, outcome.reason))
        return copies

    def _dead_letter(self, delivery: AbstractIncomingMessage, reason: str) -> Copy:
        async def publish() -> Parked:
            return await self._dead_letters.publish(delivery, reason)

        return Copy(delivery, publish, None)

    def _retry(self, delivery: AbstractIncomingMessage, outcome: Defer) -> Copy:
        attempts = attempts_so_far(delivery.headers, this_one_counts=outcome.counts)
        retries = self._retries
        tier = retries.choose(attempts, outcome.after_s, outcome.counts) if retries else None
        if retries is None or tier is None:
            return self._dead_letter(
                delivery, f"gave up after {attempts} attempts: {outcome.reason}"
            )

        async def publish() -> Parked:
            # The planner's publisher at the time of the publish: it may have been replaced.
            assert self._retries is not None
            return await self._retries.publish(delivery, tier, outcome.reason, attempts)

        return Copy(delivery, publish, tier[0])


class CopyChannel:
    """The confirm channel of ``connection`` that ``queue``'s copies go out on, to its
    dead-letter queue and its retry ``tiers`` ((delay_s, tier queue), ascending), and their
    planner; :meth:`renew` moves both to a new channel."""

    def __init__(
        self,
        connection: AbstractConnection,
        topology: Topology,
        queue: str,
        tiers: Sequence[tuple[float, str]],
        timeout_s: float,
    ) -> None:
        self._connection = connection
        self._topology = topology
        self._queue = queue
        self._tiers = tiers
        self._timeout_s = timeout_s
        self.channel: AbstractChannel | None = None
        self._planner: CopyPlanner | None = None

    @property
    def planner(self) -> CopyPlanner:
        assert self._planner is not None, "open() first"
        return self._planner

    async def open(self) -> None:
        self.channel, self._planner = await self._open()

    async def renew(self) -> None:
        """Copies nacked: publish them, and those planned already, on a new channel."""
        old = self.channel
        try:
            async with asyncio.timeout(self._timeout_s):
                self.channel, renewed = await self._open()
        except Exception as exc:  # the next nack tries again
            log.warning("copy_channel_not_renewed", queue=self._queue, error=repr(exc))
            return
        self.planner.replace(renewed)
        log.info("copy_channel_renewed", queue=self._queue)
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), self._timeout_s)

    async def _open(self) -> tuple[AbstractChannel, CopyPlanner]:
        channel = await self._connection.channel(publisher_confirms=True)
        return channel, await open_planner(
            channel, self._topology, self._queue, self._tiers, self._timeout_s
        )


async def open_planner(
    channel: AbstractChannel,
    topology: Topology,
    queue: str,
    tiers: Sequence[tuple[float, str]],
    timeout_s: float,
) -> CopyPlanner:
    """The planner of ``queue``'s copies, publishing on ``channel`` (with publisher confirms)
    to its dead-letter queue and to its retry ``tiers`` ((delay_s, tier queue), ascending)."""
    dead_letters = DeadLetterPublisher(
        await channel.get_exchange(topology.dead_letter_exchange, ensure=True),
        routing_key=topology.dead_letter_queue(queue),
        queue=queue,
        timeout_s=timeout_s,
    )
    retries = None
    if tiers:
        retries = RetryPublisher(
            await channel.get_exchange(topology.retry_exchange, ensure=True),
            tiers=tiers,
            queue=queue,
            timeout_s=timeout_s,
        )
    alone = AlonePublisher(channel.default_exchange, queue=queue, timeout_s=timeout_s)
    return CopyPlanner(dead_letters, retries, alone)


async def publish_copies(copies: Sequence[Copy]) -> tuple[list[Copy], list[Parked], bool]:
    """Publish all at once (each waits for its own confirm): the ones that failed, what the
    confirmed ones parked, and whether the broker nacked any."""
    results = await asyncio.gather(*(copy.publish() for copy in copies), return_exceptions=True)
    failed = [
        copy
        for copy, result in zip(copies, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if failed:
        errors = [r for r in results if isinstance(r, BaseException)]
        log.warning("copy_publish_retry", count=len(failed), error=repr(errors[0]))
    nacked = any(isinstance(r, PublishFailed) and r.refused == "nacked" for r in results)
    return failed, [r for r in results if isinstance(r, Parked)], nacked


async def publish_all(
    copies: list[Copy],
    counters: Counters,
    initial_backoff_s: float,
    max_backoff_s: float,
    renew: Callable[[], Awaitable[None]] | None = None,
) -> list[Parked] | None:
    """Publish every copy, confirmed, retrying the failed ones with backoff: what they parked,
    or None if their channel was lost meanwhile (the broker redelivers the originals). After
    a nack, ``renew`` moves the copies to a new channel first (bridge/publishing.py: on
    RabbitMQ 3.10 a channel opened while a queue had no leader nacks for good)."""
    backoff_s = initial_backoff_s
    parked: list[Parked] = []
    while True:
        failed, confirmed, nacked = await publish_copies(copies)
        if nacked and renew is not None:
            await renew()
        parked += confirmed
        for copy in copies:
            if copy not in failed:
                if copy.alone:
                    counters.record_alone()
                else:
                    counters.record_copy(copy.tier_s)
        if not failed:
            return parked
        copies = failed
        if not any(channel_open(copy.delivery) for copy in copies):
            return None
        counters.record_retry()
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, max_backoff_s)


def channel_open(delivery: AbstractIncomingMessage) -> bool:
    try:
        return not delivery.channel.is_closed
    except RuntimeError:  # ChannelInvalidStateError: aio-pika refuses to hand out a closed one
        return False


class Parking:
    """Tells the ledger of parked messages' ages (bridge/parked.py) what the runtime parked in
    ``queues`` (its dead-letter queue and retry tiers) and what came back from them; without
    a ledger, nothing. A failed write costs the age only."""

    def __init__(self, ledger: Ledger | None, queues: Collection[str]) -> None:
        self._ledger = ledger
        self._queues = frozenset(queues)

    async def record(self, parked: Sequence[Parked]) -> None:
        if self._ledger is not None:
            await softly("record", self._ledger.record(parked))

    async def forget_returned(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """Forget the messages a retry tier (or a DLQ, moved by hand) handed back: their
        copy's x-parked-in names the queue."""
        if self._ledger is None:
            return
        back: dict[str, list[str]] = {}
        for delivery in batch:
            parked_in = (delivery.headers or {}).get(HEADER_PARKED_IN)
            if isinstance(parked_in, bytes):
                parked_in = parked_in.decode("utf-8", errors="replace")
            if isinstance(parked_in, str) and parked_in in self._queues and delivery.message_id:
                back.setdefault(parked_in, []).append(delivery.message_id)
        for queue, ids in back.items():
            await softly("release", self._ledger.release(queue, ids))
