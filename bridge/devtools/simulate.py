"""Signed webhooks as edrone sends them (pure builders, reused by tests and benchmarks) and a
bounded HTTP sender that fires them at a running ingress and summarises the answers."""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from bridge import signing

VERSIONS = ("NATIVE_5", "NATIVE_4", "LEGACY_UPDATE", "LEGACY_UNSUBSCRIBE")
CHANNELS = ("email", "sms")
BODY_FORMATS = ("json", "form")
SECRET_PART = "app_secret"

# A plausible reason per (channel, status) when the caller names none (docs/protocol.md §3).
_DEFAULT_REASON = {
    ("email", "1"): "10",  # TRACE_SUBSCRIBED
    ("email", "0"): "1",  # CUSTOMER_UNSUBSCRIBED
    ("email", ""): "13",  # TRACE_UNKNOWN
    ("sms", "1"): "5",  # AGENT_SUBSCRIBED
    ("sms", "0"): "6",  # CUSTOMER_UNSUBSCRIBED
    ("sms", ""): "3",  # DATA_IMPORT_UNKNOWN
}
_SAMPLE_CHARS = 300


def random_email() -> str:
    return f"sim-{uuid.uuid4().hex[:16]}@example.com"


def random_phone() -> str:
    # A Polish number of the 5xx ranges, all of them valid ones: the ingress refuses others.
    return "+485" + "".join(random.choices("0123456789", k=8))


def edrone_date(moment: datetime | None = None) -> str:
    """A UTC time in the ``2024-01-15 10:30:00`` form seen in edrone's webhooks."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def build_webhook(
    version: str,
    app_id: str,
    secret: str,
    *,
    channel: str = "email",
    email: str | None = None,
    phone: str | None = None,
    status: str = "1",
    reason: str | None = None,
    event_date: str | None = None,
    event_id: str | None = None,
) -> dict[str, str]:
    """The fields edrone would POST for one status change, signed with ``secret``.

    Unset identifiers are random, ``event_id`` is unique and ``event_date`` is now. ``status``
    is ``"1"``, ``"0"`` or ``""`` (unknown); ``channel="sms"`` exists only in NATIVE_5. The
    legacy callbacks carry no ``app_id``, as edrone's Magento 1 module sent them."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; expected one of {', '.join(VERSIONS)}")
    if channel not in CHANNELS or (channel == "sms" and version != "NATIVE_5"):
        raise ValueError(f"channel {channel!r} does not exist in {version}")
    email = email if email is not None else random_email()
    if version == "LEGACY_UNSUBSCRIBE":
        fields = {"email": email}
        fields["token"] = signing.sign(version, fields, secret, app_id)
        return fields
    fields = {
        "email": email,
        "subscriber_status": status,
        "subscription_status_reason": reason or _DEFAULT_REASON.get((channel, status), "1"),
        "event_date": event_date if event_date is not None else edrone_date(),
        "event_id": event_id if event_id is not None else f"sim-{uuid.uuid4()}",
        "app_id": app_id,
    }
    if version == "NATIVE_5":
        fields["subscription_status_type_id"] = "2" if channel == "sms" else "1"
        if channel == "sms" or phone is not None:
            fields["phone"] = phone if phone is not None else random_phone()
    if version == "LEGACY_UPDATE":
        # Its signature has no reason, and an app_id would make it read as NATIVE_4.
        del fields["subscription_status_reason"], fields["app_id"]
    fields["signature"] = signing.sign(version, fields, secret, app_id)
    return fields


def signature_parts(
    version: str, fields: Mapping[str, str], secret: str, app_id: str
) -> list[tuple[str, str]]:
    """The (name, value) pairs that ``version``'s signature hashes, concatenated in this order.

    For showing a shop developer what went into a signature; the part named
    :data:`SECRET_PART` holds the secret, so mask it before printing."""
    if version == "LEGACY_UNSUBSCRIBE":
        names = ["email", "app_id", SECRET_PART]
    elif version == "LEGACY_UPDATE":
        names = ["email", "subscriber_status", "event_date", "event_id", SECRET_PART, "app_id"]
    else:
        is_sms = version == "NATIVE_5" and fields.get("subscription_status_type_id", "1") != "1"
        names = [
            "phone" if is_sms else "email",
            "subscriber_status",
            "subscription_status_reason",
            "event_date",
            "event_id",
            SECRET_PART,
            "app_id",
        ]
    values = {**fields, SECRET_PART: secret, "app_id": app_id}
    return [(name, values.get(name, "")) for name in names]


def signature_formula(version: str, parts: list[tuple[str, str]]) -> str:
    inner = f"sha256({' . '.join(name for name, _ in parts)})"
    return f"hex({inner})" if version == "LEGACY_UNSUBSCRIBE" else f"base64(hex({inner}))"


@dataclass
class Summary:
    """What the ingress answered: a count per HTTP status (or client error), and timings."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    # The first answer (or error text) seen for each outcome that is not a 2xx.
    samples: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def record(self, outcome: str, detail: str, latency_s: float) -> None:
        self.outcomes[outcome] += 1
        self.latencies_s.append(latency_s)
        if detail and not _is_2xx(outcome):
            self.samples.setdefault(outcome, detail[:_SAMPLE_CHARS])

    @property
    def count(self) -> int:
        return sum(self.outcomes.values())

    @property
    def all_accepted(self) -> bool:
        return self.count > 0 and all(_is_2xx(outcome) for outcome in self.outcomes)

    @property
    def requests_per_s(self) -> float:
        return self.count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, percent: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds (0 when nothing was sent)."""
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        rank = max(1, math.ceil(percent / 100 * len(ordered)))
        return ordered[rank - 1] * 1000

    def render(self) -> str:
        lines = [
            f"sent {self.count} in {self.elapsed_s:.2f} s ({self.requests_per_s:.1f} requests/s)"
        ]
        for outcome, number in sorted(self.outcomes.items()):
            sample = self.samples.get(outcome)
            lines.append(f"  {outcome}: {number}" + (f"  e.g. {sample}" if sample else ""))
        lines.append(
            f"latency p50 {self.percentile_ms(50):.1f} ms, p99 {self.percentile_ms(99):.1f} ms"
        )
        return "\n".join(lines)


def _is_2xx(outcome: str) -> bool:
    return outcome.isdigit() and 200 <= int(outcome) < 300


async def send_webhooks(
    url: str,
    bodies: Iterable[Mapping[str, str]],
    *,
    body_format: str = "json",
    concurrency: int = 10,
    timeout_s: float = 10.0,
) -> Summary:
    """POST every body to ``url``, at most ``concurrency`` at a time, each request bounded by
    ``timeout_s``; connection errors and timeouts are counted, never raised."""
    if body_format not in BODY_FORMATS:
        raise ValueError(f"body_format must be one of {BODY_FORMATS}, got {body_format!r}")
    summary = Summary()
    pending = iter(bodies)  # shared by the workers: bodies are built only as they are sent
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=concurrency),
        ) as session,
        asyncio.TaskGroup() as group,
    ):
        for _ in range(concurrency):
            group.create_task(_worker(session, url, pending, body_format, summary))
    summary.elapsed_s = time.perf_counter() - started
    return summary


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    pending: Iterator[Mapping[str, str]],
    body_format: str,
    summary: Summary,
) -> None:
    for body in pending:
        summary.record(*await _post(session, url, body, body_format))


async def _post(
    session: aiohttp.ClientSession, url: str, body: Mapping[str, str], body_format: str
) -> tuple[str, str, float]:
    started = time.perf_counter()
    request = (
        session.post(url, json=dict(body))
        if body_format == "json"
        else session.post(url, data=dict(body))
    )
    try:
        async with request as response:
            text = await response.text()
            return str(response.status), text, time.perf_counter() - started
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__, str(exc), time.perf_counter() - started
