"""Typed errors a consumer handler uses to tell the runtime what to do with its messages."""

from __future__ import annotations


class Reject(Exception):
    """This message can never be processed (undecodable, breaks the schema, unknown app):
    the runtime dead-letters it with ``reason`` in its ``x-error`` header.

    Raised by a handler's decoding step and *returned* by the handler as that message's
    outcome, so that one bad message does not hold up the rest of its batch."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(Exception):
    """The whole batch failed for a passing reason (database down, deadlock): the runtime
    keeps it in memory and hands it to the handler again after a backoff.

    ``delay_s`` overrides the runtime's exponential backoff for this one retry."""

    def __init__(self, reason: str, *, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s
