"""The runtime's vocabulary: what a handler gets and returns, what to consume, and what the
consumer counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

from bridge.metrics import Metrics
from consumers.outcomes import Outcome, Result

Delivery = AbstractIncomingMessage
# One result per delivery, in order (consumers/outcomes.py); raises for the whole batch.
Handler = Callable[[Sequence[Delivery]], Awaitable[Sequence[Result]]]


@dataclass(frozen=True)
class ConsumerSpec:
    """What to consume and how to handle it: what is not a setting. The runtime's numbers
    come from the consumer's settings group (``bridge.config.ConsumerOptions``)."""

    queue: str
    handler: Handler
    # Bound on one handler call (one database transaction); past it the batch is retried.
    timeout_s: float
    # Delays of the queue's retry tiers (declared with the topology): a Defer goes to one of
    # them, or to the dead-letter queue without them.
    retry_tiers_s: Sequence[float] = ()
    # Does the handler's service (its database) answer now? Asked after a batch failed for a
    # reason about the service: if not, the failure does not count against the messages.
    probe: Callable[[], Awaitable[bool]] | None = None


@dataclass
class Counters:
    """What the consumer did since it started; mirrored into ``metrics`` when given."""

    applied: int = 0
    # Traces edrone accepted (the trace forwarder's own "applied").
    sent: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dead_lettered: int = 0
    # Messages sent to a retry tier, by the tier's delay in seconds.
    deferred: Counter[float] = field(default_factory=Counter)
    batches: int = 0
    retries: int = 0
    # Deliveries forgotten because their channel was lost; the broker redelivers them.
    dropped: int = 0
    # Times the watchdog found the consumer lost and registered it again.
    reregistered: int = 0
    # Failing batches split in halves to find the message that fails them, and the messages
    # found so and dead-lettered alone (docs/design.md promise 7).
    splits: int = 0
    isolated: int = 0
    # Parts of redelivered bundles sent back to the queue alone (consumers/bundles.py).
    alone: int = 0
    queue: str = ""
    metrics: Metrics | None = field(default=None, repr=False)

    def summary(self) -> dict[str, object]:
        """The counts as log fields (plain values: JSON logs show them as numbers)."""
        return {
            "applied": self.applied,
            "sent": self.sent,
            "skipped": dict(self.skipped),
            "dead_lettered": self.dead_lettered,
            "deferred": {f"{tier:g}s": n for tier, n in self.deferred.items()},
            "batches": self.batches,
            "retries": self.retries,
            "splits": self.splits,
            "isolated": self.isolated,
            "alone": self.alone,
            "dropped": self.dropped,
            "reregistered": self.reregistered,
        }

    def record_copy(self, tier_s: float | None) -> None:
        """A confirmed copy: to the dead-letter queue (``tier_s`` None) or a retry tier."""
        if tier_s is None:
            self.dead_lettered += 1
            if self.metrics:
                self.metrics.dead_lettered.labels(self.queue).inc()
        else:
            self.deferred[tier_s] += 1
            if self.metrics:
                self.metrics.retries.labels(self.queue, f"{tier_s:g}s").inc()

    def record(self, outcomes: Sequence[Result], duration_s: float) -> None:
        # Plain names: they show in repr(), in the logs and as metric labels.
        tally = Counter(str(o) for o in outcomes if isinstance(o, str))
        if self.metrics:
            for outcome, count in tally.items():
                self.metrics.events.labels(self.queue, outcome).inc(count)
            self.metrics.batch_size.labels(self.queue).observe(len(outcomes))
            self.metrics.batch_seconds.labels(self.queue).observe(duration_s)
        self.applied += tally.pop(Outcome.APPLIED, 0)
        self.sent += tally.pop(Outcome.SENT, 0)
        self.skipped.update(tally)
        self.batches += 1

    def record_alone(self) -> None:
        self.alone += 1
        if self.metrics:
            self.metrics.bundle_parts_resent.labels(self.queue).inc()

    def record_retry(self) -> None:
        self.retries += 1
        if self.metrics:
            self.metrics.batch_retries.labels(self.queue).inc()

    def record_split(self) -> None:
        self.splits += 1
        if self.metrics:
            self.metrics.batch_splits.labels(self.queue).inc()
