"""Handling one batch until every message in it has an outcome (docs/design.md promise 7): an error
about the service retries the batch after a backoff; an error that may lie in a message's
content splits the batch in halves until that message stands alone, and it alone is
dead-lettered, with the error, while the rest of the batch goes through."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from consumers.outcomes import Reject, Result, RetryLater
from consumers.spec import Counters, Delivery, Handler

log = structlog.get_logger(__name__)

# Does the service answer now? Tells a failure of the service from one of the work.
Probe = Callable[[], Awaitable[bool]]
Live = Callable[[list[Delivery]], list[Delivery]]
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class _Failure:
    reason: str
    # A service error: retry the same messages. Else the content of one of them is suspect.
    about_service: bool
    counts: bool = True
    delay_s: float | None = None


@dataclass
class BatchAttempts:
    """Runs ``handler`` on a batch, and on parts of it, until every live delivery has an
    outcome; see the module's docstring.

    :param timeout_s: bound on one handler call; past it the call counts as a service error.
    :param max_failures: a message in this many counted failures is narrowed down and, failing
        alone once more, dead-lettered whatever the cause. A failure counts unless the service
        was not reached (``RetryLater(counts=False)``, or ``probe`` says it does not answer).
    """

    handler: Handler
    timeout_s: float
    initial_backoff_s: float
    max_backoff_s: float
    max_failures: int
    counters: Counters
    probe: Probe | None = None
    _failures: dict[int, int] = field(default_factory=dict, repr=False)

    async def run(
        self, batch: list[Delivery], live: Live
    ) -> tuple[list[Delivery], list[Result]] | None:
        """(deliveries, outcomes) in the batch's order, leaving out deliveries whose channel
        was lost meanwhile (``live`` drops them); ``None`` if none is left."""
        outcomes: dict[int, Result] = {}
        groups: deque[list[Delivery]] = deque([batch])
        backoff_s = self.initial_backoff_s
        self._failures.clear()
        while groups:
            group = live(groups.popleft())
            if not group:
                continue
            failure = await self._attempt(group, outcomes)
            if failure is None:
                backoff_s = self.initial_backoff_s
                continue
            if failure.about_service and not await self._worn_out(group, failure):
                groups.appendleft(group)
                delay_s = backoff_s if failure.delay_s is None else failure.delay_s
                log.warning("batch_retry", size=len(group), reason=failure.reason, delay_s=delay_s)
                self.counters.record_retry()
                await asyncio.sleep(delay_s)
                backoff_s = min(backoff_s * 2, self.max_backoff_s)
                continue
            if len(group) == 1:
                outcomes[id(group[0])] = self._give_up(group[0], failure)
                continue
            # Halves, first half first: the order within the batch stays as it came.
            middle = len(group) // 2
            groups.extendleft([group[middle:], group[:middle]])
            self.counters.record_split()
            log.warning("batch_split", size=len(group), reason=failure.reason)
        kept = [delivery for delivery in batch if id(delivery) in outcomes]
        if not kept:
            return None
        return kept, [outcomes[id(delivery)] for delivery in kept]

    async def _attempt(self, group: list[Delivery], outcomes: dict[int, Result]) -> _Failure | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                results = await self.handler(group)
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} outcomes for {len(group)} messages")
        except RetryLater as exc:
            cause = f" ({exc.__cause__!r})" if exc.__cause__ else ""
            return _Failure(exc.reason + cause, True, exc.counts, exc.delay_s)
        except TimeoutError:
            return _Failure(f"no outcome within {self.timeout_s:g}s", True)
        except Exception as exc:
            return _Failure(f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS], False)
        outcomes.update(zip(map(id, group), results, strict=True))
        return None

    async def _worn_out(self, group: Sequence[Delivery], failure: _Failure) -> bool:
        """Count the failure against the group's messages unless the service was not reached;
        True once one of them has reached ``max_failures``."""
        if not failure.counts or (self.probe is not None and not await self.probe()):
            return False
        worn = False
        for delivery in group:
            count = self._failures.get(id(delivery), 0) + 1
            self._failures[id(delivery)] = count
            worn |= count >= self.max_failures
        return worn

    def _give_up(self, delivery: Delivery, failure: _Failure) -> Reject:
        """The message that makes its batch fail, alone: dead-lettered with the error."""
        self.counters.isolated += 1
        if failure.about_service:
            reason = f"failed {self.max_failures} batches, the last alone: {failure.reason}"
        else:
            reason = f"failed alone: {failure.reason}"
        log.warning("message_isolated", event_id=delivery.message_id, reason=reason)
        return Reject(reason)
