"""What a handler tells the runtime, in one direction each: a message's outcome is *returned*
(an :class:`Outcome` name, a :class:`Reject` or a :class:`Defer`), so one message never holds up
its batch; a problem of the whole batch is *raised* (:class:`RetryLater`, or any other exception,
which the runtime narrows down to the message that causes it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import ValidationError

from bridge.db import CONTENT, TRANSIENT, classify


class Outcome(StrEnum):
    """What became of a message that needs no copy. The values are Prometheus label values
    and stored in ``inbox.outcome`` (the SQL of consumers/subscriptions.py names two of them):
    never rename one."""

    APPLIED = "applied"
    # The subscription consumer's skips.
    DUPLICATE = "duplicate"  # seen before: a redelivery, or edrone's retry of the same event
    OLDER = "older"  # a newer status is stored (promise 3), or a person's newer change won
    FILTERED = "filtered"  # the app's sync filter excludes this kind of change
    # Applied to the ledger, but the address has no row in the shop's table (and
    # create_missing is off): acked, counted, the ledger keeps what edrone said (promise 4).
    UNKNOWN_CUSTOMER = "unknown_customer"
    # The trace forwarder's: a trace edrone accepted (2xx), and for a message that makes no
    # call of its own, why not.
    SENT = "sent"
    COALESCED = "coalesced"  # a later message of the same customer in the batch carries its trace
    NOOP = "noop"  # edrone is known to hold the winner: nothing to tell it
    ECHO = "echo"  # the shop mirroring a write of the bridge's: nothing to tell edrone
    UNREACHABLE = "unreachable"  # an SMS address whose customer's e-mail is unknown
    # A shop row (backfill, reconcile) that would resubscribe an address the bridge knows
    # unsubscribed: never sent, left for a person (reconcile reports it).
    KEPT = "kept"


@dataclass(frozen=True)
class Reject:
    """This message can never be processed (undecodable, breaks the schema, unknown app,
    refused by edrone): the runtime dead-letters it with ``reason`` in its ``x-error``
    header."""

    reason: str


@dataclass(frozen=True)
class Defer:
    """Try this one message again later, through the queue's retry tiers (never by sleeping
    in the handler: RabbitMQ drops a consumer that holds a message unacked for 30 minutes).

    ``after_s`` is the server's Retry-After, if it gave one; ``counts`` is False for a retry
    that is not the message's fault (the forwarder pausing while edrone is down), which does
    not use up a tier. When the tiers are used up the runtime dead-letters the message with
    ``reason``."""

    reason: str
    after_s: float | None = None
    counts: bool = True


# Per message, what a handler returns.
Result = Outcome | Reject | Defer


class InvalidMessage(Exception):
    """Raised by a decoder: the message can never be processed. Its handler turns it into
    that message's :class:`Reject` (a value), so the rest of the batch goes on."""

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


def describe_validation_error(exc: ValidationError) -> str:
    """Where and why a message breaks its schema; never the input values, which may hold
    personal data."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )
