"""Typed errors a consumer handler uses to tell the runtime what to do with its messages."""

from __future__ import annotations

from pydantic import ValidationError

from bridge.db import CONTENT, TRANSIENT, classify


class Reject(Exception):
    """This message can never be processed (undecodable, breaks the schema, unknown app):
    the runtime dead-letters it with ``reason`` in its ``x-error`` header.

    Raised by a handler's decoding step and *returned* by the handler as that message's
    outcome, so that one bad message does not hold up the rest of its batch."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(Exception):
    """The whole batch failed for a reason about the service, not the messages (database
    down, a deadlock, a timeout): the runtime keeps it in memory and hands it to the handler
    again after a backoff.

    ``delay_s`` overrides the runtime's exponential backoff for this one retry. ``counts`` is
    False when the service was not even reached: the failure then does not count toward the
    messages' ``max_batch_failures``. Any other exception from a handler is taken to lie in a
    message's content, and the runtime narrows the batch down to that message."""

    def __init__(self, reason: str, *, delay_s: float | None = None, counts: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s
        self.counts = counts


def database_retry(exc: Exception) -> RetryLater | None:
    """The :class:`RetryLater` for a database error about the service; None for one that may
    lie in a message's content (re-raise it: the runtime isolates the message)."""
    kind = classify(exc)
    if kind == CONTENT:
        return None
    return RetryLater(f"database: {type(exc).__name__}", counts=kind == TRANSIENT)


class Defer(Exception):
    """Try this one message again later, through the queue's retry tiers (never by sleeping
    in the handler: RabbitMQ drops a consumer that holds a message unacked for 30 minutes).

    ``after_s`` is the server's Retry-After, if it gave one; ``counts`` is False for a retry
    that is not the message's fault (the forwarder pausing while edrone is down), which does
    not use up a tier. *Returned* by a handler as the message's outcome, like :class:`Reject`;
    when the tiers are used up the runtime dead-letters the message with ``reason``."""

    def __init__(self, reason: str, *, after_s: float | None = None, counts: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_s = after_s
        self.counts = counts


def describe_validation_error(exc: ValidationError) -> str:
    """Where and why a message breaks its schema; never the input values, which may hold
    personal data."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )
