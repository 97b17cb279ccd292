"""What a batch's rejected and deferred messages become: confirmed copies in the dead-letter
queue or in a retry tier, all published before the runtime may ack the batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from aio_pika.abc import AbstractIncomingMessage

from bridge.headers import attempts_so_far
from consumers.deadletter import DeadLetterPublisher, RetryPublisher
from consumers.outcomes import Defer, Reject
from consumers.spec import Counters

log = structlog.get_logger(__name__)


@dataclass(frozen=True, eq=False)
class Copy:
    """One confirmed copy to publish for ``delivery``: to a retry tier of ``tier_s`` seconds,
    or to the dead-letter queue when ``tier_s`` is None."""

    delivery: AbstractIncomingMessage
    publish: Callable[[], Awaitable[None]]
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
        async def publish() -> None:
            await self._dead_letters.publish(delivery, reason)

        return Copy(delivery, publish, None)

    def _retry(self, delivery: AbstractIncomingMessage, outcome: Defer) -> Copy:
        attempts = attempts_so_far(delivery.headers, this_one_counts=outcome.counts)
        retries = self._retries
        tier = retries.choose(attempts, outcome.after_s, outcome.counts) if retries else None
        if retries is None or tier is None:
            return self._dead_letter(
                delivery, f"gave up after {attempts} attempts: {outcome.reason}"
            )

        async def publish() -> None:
            await retries.publish(delivery, tier, outcome.reason, attempts)

        return Copy(delivery, publish, tier[0])


async def publish_copies(copies: Sequence[Copy]) -> list[Copy]:
    """Publish all at once (each waits for its own confirm); return the ones that failed."""
    results = await asyncio.gather(*(copy.publish() for copy in copies), return_exceptions=True)
    failed = [
        copy
        for copy, result in zip(copies, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if failed:
        errors = [r for r in results if isinstance(r, BaseException)]
        log.warning("copy_publish_retry", count=len(failed), error=repr(errors[0]))
    return failed


async def publish_all(
    copies: list[Copy], counters: Counters, initial_backoff_s: float, max_backoff_s: float
) -> bool:
    """Publish every copy, confirmed, retrying the failed ones with backoff; False if their
    channel was lost meanwhile (the broker redelivers the originals)."""
    backoff_s = initial_backoff_s
    while True:
        failed = await publish_copies(copies)
        for copy in copies:
            if copy not in failed:
                counters.record_copy(copy.tier_s)
        if not failed:
            return True
        copies = failed
        if not any(channel_open(copy.delivery) for copy in copies):
            return False
        counters.record_retry()
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, max_backoff_s)


def channel_open(delivery: AbstractIncomingMessage) -> bool:
    try:
        return not delivery.channel.is_closed
    except RuntimeError:  # ChannelInvalidStateError: aio-pika refuses to hand out a closed one
        return False
