"""What a batch's rejected and deferred messages become: confirmed copies in the dead-letter
queue or in a retry tier, all published before the runtime may ack the batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bridge.amqp import Topology
from bridge.headers import HEADER_PARKED_IN, attempts_so_far
from bridge.parked import Ledger, Parked, softly
from consumers.deadletter import DeadLetterPublisher, RetryPublisher
from consumers.outcomes import Defer, Reject
from consumers.spec import Counters

log = structlog.get_logger(__name__)


@dataclass(frozen=True, eq=False)
class Copy:
    """One confirmed copy to publish for ``delivery``: to a retry tier of ``tier_s`` seconds,
    or to the dead-letter queue when ``tier_s`` is None."""

    delivery: AbstractIncomingMessage
    publish: Callable[[], Awaitable[Parked]]
    tier_s: float | None


class CopyPlanner:
    """Turns Reject and Defer outcomes into copies; a Defer past the last tier (or without
    tiers) becomes a dead letter that says how many attempts were made."""

    def __init__(self, dead_letters: DeadLetterPublisher, retries: RetryPublisher | None) -> None:
        self._dead_letters = dead_letters
        self._retries = retries

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
            return await retries.publish(delivery, tier, outcome.reason, attempts)

        return Copy(delivery, publish, tier[0])


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
    return CopyPlanner(dead_letters, retries)


async def publish_copies(copies: Sequence[Copy]) -> tuple[list[Copy], list[Parked]]:
    """Publish all at once (each waits for its own confirm): the ones that failed, and what
    the confirmed ones parked."""
    results = await asyncio.gather(*(copy.publish() for copy in copies), return_exceptions=True)
    failed = [
        copy
        for copy, result in zip(copies, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if failed:
        errors = [r for r in results if isinstance(r, BaseException)]
        log.warning("copy_publish_retry", count=len(failed), error=repr(errors[0]))
    return failed, [r for r in results if isinstance(r, Parked)]


async def publish_all(
    copies: list[Copy], counters: Counters, initial_backoff_s: float, max_backoff_s: float
) -> list[Parked] | None:
    """Publish every copy, confirmed, retrying the failed ones with backoff: what they parked,
    or None if their channel was lost meanwhile (the broker redelivers the originals)."""
    backoff_s = initial_backoff_s
    parked: list[Parked] = []
    while True:
        failed, confirmed = await publish_copies(copies)
        parked += confirmed
        for copy in copies:
            if copy not in failed:
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
