"""The message-header contract, in one place for the side that writes it (the consumer runtime
dead-letters and retries) and the sides that read it (``status``, ``dlq``, ``/metrics``): the
header names, the headers a dead-lettered, retried or replayed copy carries, and what they say
about a message: its failed attempts, when the broker dead-lettered it
(docs/design.md promise 4)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

# Set by the runtime on every copy it dead-letters or sends to a retry tier.
HEADER_ERROR = "x-error"
HEADER_ATTEMPTS = "x-attempts"
HEADER_FIRST_FAILURE = "x-first-failure-at"
HEADER_DEAD_LETTERED_AT = "x-dead-lettered-at"
HEADER_ORIGINAL_QUEUE = "x-original-queue"
# The dead-letter queue or retry tier the copy was parked in: a message back from a tier
# says which one, so that its age is forgotten (bridge/parked.py).
HEADER_PARKED_IN = "x-parked-in"
# Set by ``dlq replay`` on the copy it puts back.
HEADER_REPLAYED_AT = "x-replayed-at"
# Set by quorum queues on every redelivery, and on every read that does not remove; a copy
# published by the bridge drops it (its redeliveries are folded into x-attempts).
HEADER_DELIVERY_COUNT = "x-delivery-count"
# The broker's own record of a dead-lettering (a delivery limit, a retry tier's TTL).
HEADER_DEATHS = "x-death"
# x-death reasons; "expired" is a retry tier handing a message back, not a failure.
DEATH_EXPIRED = "expired"
DEATH_DELIVERY_LIMIT = "delivery_limit"

# A replayed message starts over: no trace of its past failures.
RESET_HEADERS = frozenset(
    {
        HEADER_ATTEMPTS,
        HEADER_ERROR,
        HEADER_FIRST_FAILURE,
        HEADER_DEAD_LETTERED_AT,
        HEADER_ORIGINAL_QUEUE,
        HEADER_PARKED_IN,
        HEADER_DEATHS,
        HEADER_DELIVERY_COUNT,
    }
)
RESET_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")
MAX_ERROR_CHARS = 1_000

# What a parked message's age is counted from (bridge/parked.py); "published": a classic
# queue's head, as the management API tells it.
AgeSince = Literal["dead_lettered", "first_failure", "published"]


# --- written by the runtime ------------------------------------------------------------------


def dead_letter_headers(
    original: Mapping[str, Any] | None, error: str, queue: str
) -> dict[str, Any]:
    """The original headers plus the error, attempts, first-failure and dead-lettering times and
    the original queue. A message that failed before (replayed from the dead-letter queue, or
    back from a retry tier) keeps its first-failure time and adds up its attempts."""
    headers = dict(original or {})
    now = _now()
    headers[HEADER_ATTEMPTS] = attempts_so_far(headers)
    headers.pop(HEADER_DELIVERY_COUNT, None)
    headers[HEADER_ERROR] = error[:MAX_ERROR_CHARS]
    headers.setdefault(HEADER_FIRST_FAILURE, now)
    headers[HEADER_DEAD_LETTERED_AT] = now
    headers[HEADER_ORIGINAL_QUEUE] = queue
    return headers


def retry_headers(original: Mapping[str, Any] | None, error: str, attempts: int) -> dict[str, Any]:
    """The headers of a copy sent to a retry tier: the attempts so far, the last error and the
    first failure's time."""
    headers = dict(original or {})
    headers.pop(HEADER_DELIVERY_COUNT, None)
    headers[HEADER_ATTEMPTS] = attempts
    headers[HEADER_ERROR] = error[:MAX_ERROR_CHARS]
    headers.setdefault(HEADER_FIRST_FAILURE, _now())
    return headers


def replay_headers(headers: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The headers a replayed message carries: its own, without any record of its failures."""
    kept = {
        name: value
        for name, value in (headers or {}).items()
        if name not in RESET_HEADERS and not name.startswith(RESET_HEADER_PREFIXES)
    }
    kept[HEADER_REPLAYED_AT] = now.isoformat(timespec="milliseconds")
    return kept


# --- read by everyone ------------------------------------------------------------------------


def attempts_so_far(headers: Mapping[str, Any] | None, *, this_one_counts: bool = True) -> int:
    """Failed attempts including this delivery: the recorded ones plus the broker's
    redeliveries (a consumer that died mid-attempt) plus this one, if it counts."""
    headers = headers or {}
    redeliveries = _count(headers.get(HEADER_DELIVERY_COUNT, 0))
    return _count(headers.get(HEADER_ATTEMPTS, 0)) + redeliveries + int(this_one_counts)


def broker_death(headers: Mapping[str, Any]) -> dict[str, Any] | None:
    """The newest ``x-death`` entry that records a failure, if the broker dead-lettered it."""
    deaths = headers.get(HEADER_DEATHS)
    if not isinstance(deaths, list):
        return None
    failures = (d for d in deaths if isinstance(d, dict) and d.get("reason") != DEATH_EXPIRED)
    return next(failures, None)


def as_datetime(value: Any) -> datetime | None:
    """A header's time (an ISO string, its bytes, or an AMQP timestamp) as an aware datetime;
    None when it is none of those."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _count(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0
