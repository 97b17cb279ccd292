"""Consumers of the bridge's queues and the runtime they share (batching, ack after commit,
retries, dead-lettering)."""

from consumers.outcomes import Defer, InvalidMessage, Outcome, Reject, Result, RetryLater
from consumers.runtime import Consumer
from consumers.spec import ConsumerSpec, Counters, Delivery

__all__ = [
    "Consumer",
    "ConsumerSpec",
    "Counters",
    "Defer",
    "Delivery",
    "InvalidMessage",
    "Outcome",
    "Reject",
    "Result",
    "RetryLater",
]
