"""Helpers for the fault tests: URLs through a proxy, webhooks sent with every answer kept, the
ledger checked against every event sent, and the bridge's commands run as subprocesses; every
wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from bridge.config import Settings
from bridge.devtools.fake_edrone import FakeEdrone
from bridge.devtools.simulate import build_webhook
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.proxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
START = datetime(2024, 5, 1, tzinfo=UTC)
# Consumer options that keep a fault test short: retries after tens of milliseconds, a quick
# watchdog, and a drain well inside the tests' bounds.
FAST_SUBSCRIPTIONS = {
    "batch_size": 200,
    "prefetch": 600,
    "flush_interval_ms": 20,
    "db_batch_timeout_s": 10.0,
    "retry_initial_backoff_s": 0.05,
    "retry_max_backoff_s": 0.5,
    "drain_timeout_s": 5.0,
    "watchdog_interval_s": 0.2,
}
FAST_TRACES = {
    "retry_tiers_s": (0.2, 0.5, 1.0),
    "flush_interval_ms": 10,
    "timeout_s": 5.0,
    "connect_timeout_s": 2.0,
    "retry_initial_backoff_s": 0.05,
    "retry_max_backoff_s": 0.2,
    "drain_timeout_s": 5.0,
    "rate_limit_per_s": 0,
    "watchdog_interval_s": 0.2,
}


def through(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def report(capsys: pytest.CaptureFixture[str], name: str, **counts: object) -> None:
    """One line of counts, written to the terminal past pytest's capture (the bridge's logs
    stay captured), so that every run shows what each fault test sent, acknowledged and stored."""
    line = f"[fault counts] {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
    with capsys.disabled():
        print("\n" + line)


# --- Webhooks: what was sent, and what the ingress answered to each event ---------------------


@dataclass(frozen=True)
class Change:
    """One status change edrone sends: the ledger must end at the newest one per address."""

    event_id: str
    address: str
    status: int
    event_date: datetime

    def webhook(self) -> dict[str, str]:
        return build_webhook(
            "NATIVE_5",
            TEST_APP_ID,
            TEST_SECRET,
            email=self.address,
            status=str(self.status),
            event_date=self.event_date.strftime("%Y-%m-%d %H:%M:%S"),
            event_id=self.event_id,
        )


def history(count: int, addresses: int, *, seed: int, tag: str) -> list[Change]:
    """``count`` changes over ``addresses`` subscribers, in shuffled order; every event_date is
    a distinct second, so exactly one change per address is the newest."""
    rng = random.Random(seed)
    seconds = rng.sample(range(10 * count), count)
    changes = [
        Change(
            event_id=f"{tag}-{n}",
            address=f"{tag}-{n % addresses}@example.com",
            status=rng.choice((0, 1)),
            event_date=START + timedelta(seconds=seconds[n]),
        )
        for n in range(count)
    ]
    rng.shuffle(changes)
    return changes


@dataclass
class Answers:
    """The last answer per event_id: an HTTP status, or the name of the client error."""

    by_event: dict[str, str] = field(default_factory=dict)
    done: int = 0
    # When each answer other than a 200 came (time.monotonic()).
    failed_at: list[float] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(self.by_event.values())

    def events(self, outcome: str) -> set[str]:
        return {event for event, answer in self.by_event.items() if answer == outcome}


async def send(
    url: str,
    changes: Iterable[Change],
    answers: Answers,
    *,
    concurrency: int = 50,
    timeout_s: float = 10.0,
    backoff_s: float = 0.0,
    per_s: float | None = None,
) -> None:
    """POST each change as edrone does (signed form), ``concurrency`` at a time (and no more
    than ``per_s`` started a second), and keep each answer in ``answers``; connection errors
    and timeouts are answers too, never raised. After an answer other than 200 a worker waits
    ``backoff_s``, as a caller honouring Retry-After would, instead of spending the whole load
    on an outage."""
    pending = enumerate(list(changes))
    started = time.monotonic()
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=concurrency),
    ) as session:

        async def worker() -> None:
            for n, change in pending:
                if per_s is not None:
                    await asyncio.sleep(max(0.0, started + n / per_s - time.monotonic()))
                try:
                    async with session.post(url, data=change.webhook()) as response:
                        await response.read()
                        outcome = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = type(exc).__name__
                answers.by_event[change.event_id] = outcome
                answers.done += 1
                if outcome != "200":
                    answers.failed_at.append(time.monotonic())
                if outcome != "200" and backoff_s:
                    await asyncio.sleep(backoff_s)

        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())


async def wait_ready(base_url: str, timeout_s: float = 30.0) -> None:
    """Poll ``/readyz`` until it answers 200; fail after ``timeout_s``."""
    async with (
        asyncio.timeout(timeout_s),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
    ):
        while True:
            try:
                async with session.get(f"{base_url}/readyz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)


def unready(base_url: str) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``wait_until``: ``/readyz`` answers 503."""

    async def check() -> bool:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(f"{base_url}/readyz") as response,
        ):
            return response.status == 503

    return check


# --- The ledger ---------------------------------------------------------------------------------


async def wait_for_count(
    db: asyncpg.Connection,
    sql: str,
    count: int,
    timeout_s: float = 60.0,
    *,
    args: Sequence[Any] = (),
) -> int:
    """Poll ``sql`` (one number) until it reaches ``count``; the last value if time runs out."""
    value = 0
    try:
        async with asyncio.timeout(timeout_s):
            while (value := await db.fetchval(sql, *args)) < count:  # noqa: ASYNC110 - a poll
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    return value


@dataclass
class LedgerCheck:
    """The inbox and the ledger compared with every change sent."""

    stored: int  # inbox rows
    missing: list[str]  # sent, never stored
    unexpected: list[str]  # stored, never sent
    wrong: list[str]  # addresses whose ledger row is not their newest change

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong)


async def check_ledger(db: asyncpg.Connection, changes: Iterable[Change]) -> LedgerCheck:
    sent = {change.event_id: change for change in changes}
    stored = {row["event_id"] for row in await db.fetch("SELECT event_id FROM inbox")}
    newest: dict[str, Change] = {}
    for change in sent.values():
        if change.address not in newest or change.event_date > newest[change.address].event_date:
            newest[change.address] = change
    rows = {
        row["address"]: row
        for row in await db.fetch("SELECT address, status, event_id, event_date FROM subscribers")
    }
    wrong = [
        address
        for address, change in newest.items()
        if address not in rows
        or (rows[address]["event_id"], rows[address]["status"], rows[address]["event_date"])
        != (change.event_id, change.status, change.event_date)
    ]
    wrong += sorted(set(rows) - set(newest))
    return LedgerCheck(
        stored=await db.fetchval("SELECT count(*) FROM inbox"),
        missing=sorted(set(sent) - stored),
        unexpected=sorted(stored - set(sent)),
        wrong=wrong,
    )


def accepted(fake: FakeEdrone) -> Counter[str]:
    """Per e-mail, how many of its traces fake-edrone answered 200."""
    return Counter(r.form["email"] for r in fake.requests if r.status == 200)


# --- The bridge's commands as subprocesses ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bridge_env(settings: Settings, **variables: str) -> dict[str, str]:
    """The environment that makes a ``python -m bridge`` process use the test's broker,
    database, prefix, schema and platform exchange, plus ``variables`` (EDRONE_BRIDGE_ names)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDRONE_BRIDGE_")}
    return {
        **clean,
        "EDRONE_BRIDGE_AMQP_URL": settings.amqp_url.get_secret_value(),
        "EDRONE_BRIDGE_DATABASE_URL": settings.database_url.get_secret_value(),
        "EDRONE_BRIDGE_DATABASE_SCHEMA": settings.database_schema,
        "EDRONE_BRIDGE_AMQP_PREFIX": settings.amqp_prefix,
        "EDRONE_BRIDGE_PLATFORM_EXCHANGE": settings.platform_exchange,
        "EDRONE_BRIDGE_APPS": f"{TEST_APP_ID}:{TEST_SECRET}",
        "EDRONE_BRIDGE_HTTP_HOST": "127.0.0.1",
        "EDRONE_BRIDGE_LOG_FORMAT": "json",
        **variables,
    }


class BridgeProcess:
    """``python -m bridge ARGS`` with its log in a file (a pipe nobody reads would fill up
    and block the bridge's logging); stopped by SIGTERM, killed if it outlives the test."""

    def __init__(self, log_path: Path, *args: str, env: Mapping[str, str]) -> None:
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> BridgeProcess:
        with self.log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge",
                *self.args,
                env=self.env,
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def terminate(
        self, timeout_s: float = 30.0, *, signal_number: int = signal.SIGTERM
    ) -> int:
        """SIGTERM (or ``signal_number``), then the exit code; killed (and the test failed)
        past ``timeout_s``."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal_number)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"{self.args} did not stop within {timeout_s} s") from None

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "unparsed", "line": line})
        return events

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]
