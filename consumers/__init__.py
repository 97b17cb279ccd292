"""Consumers of the bridge's queues and the runtime they share (batching, ack after commit,
retries, dead-lettering)."""

from consumers.errors import Reject, RetryLater
from consumers.runtime import APPLIED, Consumer, ConsumerSpec, Counters, Delivery, Outcome

__all__ = [
    "APPLIED",
    "Consumer",
    "ConsumerSpec",
    "Counters",
    "Delivery",
    "Outcome",
    "Reject",
    "RetryLater",
]
