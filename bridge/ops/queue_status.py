"""What RabbitMQ says about the deployment's queues: counts from the management HTTP API, or
from passive declares when it does not answer. No message is read: on RabbitMQ 3.10 a peek
moves a quorum queue's head to its back, so parked messages' ages come from the bridge's own
ledger (bridge/parked.py, read by bridge/ops/status.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import aio_pika
import aiohttp
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity
from yarl import URL

from bridge.amqp import QueueKind, QueueSpec
from bridge.headers import AgeSince

MANAGEMENT_PORT = 15672
MANAGEMENT_TLS_PORT = 15671
# Only what status shows: a queue's full record also holds each member's GC state.
_API_COLUMNS = (
    "name,messages_ready,messages_unacknowledged,consumers,head_message_timestamp,"
    "leader,members,online"
)
# Broker failures that status reports instead of raising.
AMQP_ERRORS = (OSError, TimeoutError, AMQPError, ChannelInvalidStateError)


@dataclass(frozen=True)
class Management:
    """The RabbitMQ management HTTP API: its base URL (no credentials) and the login header."""

    url: str
    authorization: str = field(repr=False)


@dataclass
class QueueStatus:
    name: str
    kind: QueueKind
    work_queue: str
    exists: bool | None = None  # None: the broker could not tell
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    source: Literal["management", "amqp"] | None = None
    oldest_age_s: float | None = None  # None: empty, or not known
    age_since: AgeSince | None = None
    age_limit_s: float | None = None
    # Parked queues: how many of its messages have an age kept by the bridge (bridge/parked.py).
    aged: int | None = None
    # A quorum queue's replicas, as the management API names the nodes: its leader, its
    # members, and those of them online (None: the API did not answer).
    leader: str | None = None
    members: list[str] | None = None
    online: list[str] | None = None

    @property
    def offline(self) -> list[str]:
        """Members not online now: the queue is one failure nearer to losing its majority."""
        if self.members is None or self.online is None:
            return []
        return [member for member in self.members if member not in self.online]

    @property
    def messages(self) -> int | None:
        if self.ready is None:
            return None
        return self.ready + (self.unacked or 0)


@dataclass
class BrokerStatus:
    url: str  # the node status reached (else the first tried), without credentials
    vhost: str
    management_url: str  # the API that answered (else the first tried)
    nodes: list[str] = field(default_factory=list)  # every node configured, without credentials
    reachable: bool = False  # over AMQP, as the bridge's processes connect
    error: str | None = None
    management_error: str | None = None  # None once the API answered


class ManagementUnavailable(Exception):
    """The management API did not answer usefully; the message says how."""


def management_for(amqp_url: str, override: str | None = None) -> Management:
    """The management API beside the broker of ``amqp_url`` (same host and login, port 15672),
    or at ``override``, whose own login, if it has one, wins. ValueError for a bad override."""
    amqp = URL(amqp_url)
    login, password = amqp.user or "guest", amqp.password or "guest"
    if override is None:
        tls = amqp.scheme == "amqps"
        base = URL.build(
            scheme="https" if tls else "http",
            host=amqp.host or "localhost",
            port=MANAGEMENT_TLS_PORT if tls else MANAGEMENT_PORT,
        )
    else:
        base = URL(override)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"expected an http:// or https:// URL with a host, got {override!r}")
        if base.user:
            login, password = base.user, base.password or ""
        base = base.with_user(None).with_query(None).with_fragment(None)
    token = base64.b64encode(f"{login}:{password}".encode()).decode("ascii")
    return Management(str(base).rstrip("/"), f"Basic {token}")


def managements_for(amqp_urls: Sequence[str], override: str | None = None) -> list[Management]:
    """The management API of each broker node of ``amqp_urls`` (any one answers for the
    whole cluster), or just ``override``."""
    if override is not None:
        return [management_for(amqp_urls[0], override)]
    return [management_for(url) for url in amqp_urls]


def vhost_of(amqp_url: str) -> str:
    """The virtual host, read as aiormq reads it."""
    path = URL(amqp_url).path
    return "/" if path in ("", "/") else path[1:].replace("%2F", "/")


async def inspect_broker(
    amqp_urls: Sequence[str],
    specs: Sequence[QueueSpec],
    managements: Sequence[Management],
    timeout_s: float,
) -> tuple[BrokerStatus, list[QueueStatus], list[str]]:
    """Counts from the management API where it answers (the first of ``managements`` that
    does), else from passive declares over the first node that connects; the age of a classic
    queue's head where the API has it (quorum queues: never), and each quorum queue's leader
    and members."""
    vhost = vhost_of(amqp_urls[0])
    shown = [str(URL(url).with_user(None)) for url in amqp_urls]
    broker = BrokerStatus(shown[0], vhost, managements[0].url, nodes=shown)
    queues = [QueueStatus(s.name, s.kind, s.work_queue) for s in specs]
    records: dict[str, dict[str, Any] | None] = {}
    for management in managements:
        try:
            records = await fetch_queues(management, vhost, [s.name for s in specs], timeout_s)
        except ManagementUnavailable as exc:
            broker.management_error = broker.management_error or str(exc)
            continue
        broker.management_url, broker.management_error = management.url, None
        break
    for queue in queues:
        if queue.name in records:
            _take_record(queue, records[queue.name])
    connection = None
    for url, url_shown in zip(amqp_urls, shown, strict=True):
        try:
            connection = await aio_pika.connect(
                url,
                timeout=timeout_s,
                client_properties={"connection_name": "edrone-bridge status"},
            )
        except AMQP_ERRORS as exc:
            broker.error = broker.error or error_text(exc, timeout_s)
            continue
        broker.url, broker.error = url_shown, None
        break
    if connection is None:
        return broker, queues, []
    broker.reachable = True
    try:
        notes = await _inspect_over_amqp(connection, queues, timeout_s)
    finally:
        await _close(connection, timeout_s)
    return broker, queues, notes


async def _inspect_over_amqp(
    connection: AbstractConnection, queues: Sequence[QueueStatus], timeout_s: float
) -> list[str]:
    notes = []
    for queue in queues:
        try:
            if queue.exists is None or (queue.exists and queue.ready is None):
                await _count(connection, queue, timeout_s)
        except AMQP_ERRORS as exc:
            notes.append(f"{queue.name}: could not be read: {error_text(exc, timeout_s)}")
    return notes


async def fetch_queues(
    management: Management, vhost: str, names: Sequence[str], timeout_s: float
) -> dict[str, dict[str, Any] | None]:
    """Each queue's record from the management API; None for a queue it does not know."""
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"Authorization": management.authorization},
    )
    records: dict[str, dict[str, Any] | None] = {}
    try:
        # One bound for all requests, so a slow API cannot hold status for timeout_s per queue.
        async with session, asyncio.timeout(timeout_s):
            for name in names:
                records[name] = await _fetch_queue(session, management.url, vhost, name)
    except TimeoutError:
        raise ManagementUnavailable(f"no answer within {timeout_s:g} s") from None
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a body that is not JSON
        raise ManagementUnavailable(str(exc) or type(exc).__name__) from None
    return records


async def _fetch_queue(
    session: aiohttp.ClientSession, base: str, vhost: str, name: str
) -> dict[str, Any] | None:
    path = f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}"
    # encoded: the vhost "/" must travel as %2F, not as a path separator.
    url = URL(base + path, encoded=True).with_query(columns=_API_COLUMNS)
    async with session.get(url) as response:
        if response.status == 404:
            return None
        if response.status in (401, 403):
            raise ManagementUnavailable(f"login refused (HTTP {response.status})")
        if response.status != 200:
            raise ManagementUnavailable(f"HTTP {response.status} for {path}")
        record = await response.json()
    if not isinstance(record, dict):
        raise ManagementUnavailable(f"unexpected answer for {path}")
    return record


def _take_record(queue: QueueStatus, record: Mapping[str, Any] | None) -> None:
    if record is None:
        queue.exists = False
        return
    queue.exists = True
    counts = [record.get(k) for k in ("messages_ready", "messages_unacknowledged", "consumers")]
    # A queue younger than the broker's statistics interval has no counts yet: AMQP fills in.
    if all(isinstance(count, int) for count in counts):
        queue.ready, queue.unacked, queue.consumers = counts
        queue.source = "management"
    if isinstance(record.get("members"), list):  # quorum queues only
        queue.leader = record.get("leader")
        queue.members = [str(member) for member in record["members"]]
        queue.online = [str(member) for member in record.get("online") or []]
    head = record.get("head_message_timestamp")  # classic queues only, in seconds
    if isinstance(head, int | float) and not isinstance(head, bool):
        queue.oldest_age_s = max(time.time() - head, 0.0)
        queue.age_since = "published"


async def _count(connection: AbstractConnection, queue: QueueStatus, timeout_s: float) -> None:
    """Ready messages and consumers by a passive declare; AMQP has no unacked count."""
    async with asyncio.timeout(timeout_s):
        channel = await connection.channel(publisher_confirms=False)
        try:
            declared = await channel.declare_queue(queue.name, passive=True)
        except ChannelNotFoundEntity:
            queue.exists = False
            return
        finally:
            if not channel.is_closed:
                await channel.close()
    result = declared.declaration_result
    queue.exists = True
    queue.ready = int(result.message_count or 0)
    queue.consumers = int(result.consumer_count or 0)
    queue.source = "amqp"


async def _close(connection: AbstractConnection, timeout_s: float) -> None:
    # The check is done: a connection the broker dropped needs no goodbye.
    with contextlib.suppress(*AMQP_ERRORS):
        await asyncio.wait_for(connection.close(), timeout_s)


# --- helpers -------------------------------------------------------------------------------


def error_text(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    return str(exc) or type(exc).__name__
