"""A dead-lettered message as ``dlq`` shows it: id, attempts, last error, age and original
queue, read from the headers of bridge/headers.py; its body and properties as JSON."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from bridge.headers import (
    DEATH_DELIVERY_LIMIT,
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTERED_AT,
    HEADER_DELIVERY_COUNT,
    HEADER_ERROR,
    HEADER_FIRST_FAILURE,
    HEADER_ORIGINAL_QUEUE,
    as_datetime,
    broker_death,
)

MESSAGE_PROPERTIES = (
    "message_id",
    "content_type",
    "content_encoding",
    "correlation_id",
    "timestamp",
    "type",
    "app_id",
    "delivery_mode",
    "priority",
)


@dataclass(frozen=True)
class DeadLetter:
    """One message of a dead-letter queue and what its headers say about its failure."""

    id: str  # message_id, else a hash of body and headers (stable across reads)
    body: bytes
    headers: dict[str, Any]  # as stored, without the DLQ's own delivery count
    properties: dict[str, Any]  # the AMQP properties that are set
    attempts: int | None
    error: str | None
    original_queue: str
    dead_lettered_at: datetime | None

    @property
    def message_id(self) -> str | None:
        value = self.properties.get("message_id")
        return None if value is None else str(value)

    def age_s(self, now: datetime) -> float | None:
        if self.dead_lettered_at is None:
            return None
        return max((now - self.dead_lettered_at).total_seconds(), 0.0)

    def summary(self, now: datetime) -> dict[str, Any]:
        """The ``list --json`` entry."""
        return {
            "id": self.id,
            "message_id": self.message_id,
            "attempts": self.attempts,
            "error": self.error,
            "age_s": _rounded(self.age_s(now)),
            "dead_lettered_at": _iso(self.dead_lettered_at),
            "first_failure_at": jsonable(self.headers.get(HEADER_FIRST_FAILURE)),
            "original_queue": self.original_queue,
            "size_bytes": len(self.body),
        }

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The ``show --json`` document: the summary, properties, headers and the body (parsed
        when it is JSON, else text, else base64)."""
        body_format, body = decode_body(self.body)
        return {
            **self.summary(now),
            "properties": jsonable(self.properties),
            "headers": jsonable(self.headers),
            "body_format": body_format,
            "body": body,
        }


def describe(
    delivery: AbstractIncomingMessage, work_queue: str, limits: Mapping[str, int]
) -> DeadLetter:
    """Read id, attempts, last error, dead-lettering time and original queue from a delivery:
    headers set by the runtime when it dead-lettered the message (``x-dead-lettered-at`` and
    friends), else the broker's ``x-death`` record (a delivery limit, say), else what is left."""
    headers = {k: v for k, v in (delivery.headers or {}).items() if k != HEADER_DELIVERY_COUNT}
    properties = {name: getattr(delivery, name) for name in MESSAGE_PROPERTIES}
    properties = {name: value for name, value in properties.items() if value is not None}
    death = broker_death(headers)
    attempts = _as_int(headers.get(HEADER_ATTEMPTS))
    error = _as_str(headers.get(HEADER_ERROR))
    when = as_datetime(headers.get(HEADER_DEAD_LETTERED_AT))
    if death is not None and HEADER_DEAD_LETTERED_AT not in headers:
        attempts, error, when = _broker_story(death, attempts, error, limits)
    original = _as_str(headers.get(HEADER_ORIGINAL_QUEUE))
    original = original or _as_str(death.get("queue") if death else None) or work_queue
    message_id = properties.get("message_id")
    return DeadLetter(
        id=str(message_id) if message_id else fallback_id(delivery.body, headers),
        body=delivery.body,
        headers=headers,
        properties=properties,
        attempts=attempts,
        error=error,
        original_queue=original,
        dead_lettered_at=when or as_datetime(delivery.timestamp),
    )


def _broker_story(
    death: Mapping[str, Any], recorded: int | None, error: str | None, limits: Mapping[str, int]
) -> tuple[int, str, datetime | None]:
    """Attempts, error and time of a message the broker dead-lettered; ``recorded`` and
    ``error`` are what the runtime wrote before (a retry tier's count and last error)."""
    reason, queue = str(death.get("reason")), _as_str(death.get("queue"))
    if reason == DEATH_DELIVERY_LIMIT and queue is not None and queue in limits:
        # RabbitMQ dead-letters once the delivery count exceeds the limit.
        deliveries = limits[queue] + 1
    else:
        deliveries = _as_int(death.get("count")) or 1
    story = f"{reason} (dead-lettered by the broker)" + (f"; before: {error}" if error else "")
    return (recorded or 0) + deliveries, story, as_datetime(death.get("time"))


def fallback_id(body: bytes, headers: Mapping[str, Any]) -> str:
    """An id for a message without ``message_id``: the same on every read of the same copy."""
    stable = {k: v for k, v in headers.items() if k != HEADER_DELIVERY_COUNT}
    canonical = json.dumps(jsonable(stable), sort_keys=True).encode()
    return "sha256-" + hashlib.sha256(body + b"\0" + canonical).hexdigest()[:16]


def decode_body(body: bytes) -> tuple[str, Any]:
    """``("json", value)``, ``("text", str)`` or ``("base64", str)``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(body).decode("ascii")
    try:
        return "json", json.loads(text)
    except ValueError:
        return "text", text


def jsonable(value: Any) -> Any:
    """AMQP header and property values as JSON values (timestamps as ISO 8601)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Decimal):
        return str(value)
    return value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) and value else None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
