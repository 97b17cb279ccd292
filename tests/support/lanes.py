"""What the two lanes' timed tests share: live shop changes published at a steady rate,
fake-edrone in a process of its own (so that edrone's side does not take the test's event loop,
which timestamps the publishes), and the figures read from what it received."""

from __future__ import annotations

import asyncio
import bisect
import statistics
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aio_pika
import aiohttp

from bridge.amqp import topology
from bridge.config import Settings
from tests.support.consumers import platform_message, ready_count, shop_event, wait_until
from tests.support.processes import REPO, free_port


async def publish_live(
    connection: aio_pika.abc.AbstractConnection,
    settings: Settings,
    seconds: float,
    sent: dict[str, float],
    *,
    per_s: float,
) -> None:
    """Shop changes at ``per_s``, each a new address, for ``seconds``; ``sent`` gets each
    address's publish time (monotonic, one clock for every process of the machine), and every
    publish is confirmed before this returns."""
    channel = await connection.channel(publisher_confirms=True)
    async with channel:
        exchange = await channel.get_exchange(settings.platform_exchange)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        confirms = []
        for _ in range(round(seconds * per_s)):
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += 1 / per_s
            event = shop_event(f"live-{uuid.uuid4().hex[:12]}@example.com")
            message = platform_message(event, with_id=True)
            sent[event["email"]] = time.monotonic()
            confirms.append(
                asyncio.create_task(
                    exchange.publish(message, settings.platform_routing_key, timeout=10)
                )
            )
        await asyncio.gather(*confirms)


async def live_rate_limit_waits(base_url: str) -> float:
    """Live trace calls that waited for the rate limit, from a process's /metrics."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"{base_url}/metrics") as response,
    ):
        text = await response.text()
    prefix = "edrone_bridge_rate_limit_waits_total"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


async def wait_drained(
    connection: aio_pika.abc.AbstractConnection, settings: Settings, timeout_s: float
) -> None:
    """Until both lanes' queues and their retry tiers hold nothing ready."""
    names = topology(settings)
    work = [names.traces_queue, names.backfill_queue]
    queues = work + [q for w in work for q in names.parked_queues(w, settings.traces.retry_tiers_s)]

    async def drained() -> bool:
        return not any([await ready_count(connection, queue) for queue in queues])

    await wait_until(drained, timeout_s)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def busiest_window(received: Iterable[float]) -> int:
    """The most requests edrone received in any one-second window."""
    times = sorted(received)
    return max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))


@dataclass(frozen=True)
class Latency:
    """Live changes' latency, publish to edrone's receipt, alone and under the background."""

    alone: list[float]
    loaded: list[float]

    @classmethod
    def of(
        cls, received: dict[str, float], alone: dict[str, float], loaded: dict[str, float]
    ) -> Latency:
        return cls(
            [received[email] - at for email, at in alone.items()],
            [received[email] - at for email, at in loaded.items()],
        )

    def figures(self) -> dict[str, float]:
        return {
            "p50_alone_ms": round(statistics.median(self.alone) * 1000, 1),
            "p50_loaded_ms": round(statistics.median(self.loaded) * 1000, 1),
            "p95_alone_ms": round(percentile(self.alone, 95) * 1000, 1),
            "p95_loaded_ms": round(percentile(self.loaded, 95) * 1000, 1),
        }

    def grew_by(self) -> tuple[float, float]:
        """How much p50 and p95 grew under the background load, in seconds."""
        return (
            statistics.median(self.loaded) - statistics.median(self.alone),
            percentile(self.loaded, 95) - percentile(self.alone, 95),
        )


class FakeEdroneProcess:
    """``edrone-bridge fake-edrone`` in a process of its own, as edrone is elsewhere in
    production; :meth:`requests` reads everything it received (each as attributes: ``form``,
    ``status``, ``received_monotonic``)."""

    def __init__(self, log_path: Path, *, max_records: int) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base_url}/trace"
        self._log_path = log_path
        self._max_records = max_records
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> FakeEdroneProcess:
        with self._log_path.open("ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge",
                "fake-edrone",
                "--port",
                str(self.port),
                "--max-records",
                str(self._max_records),
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
            )
        async with (
            asyncio.timeout(30),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
        ):
            while True:
                try:
                    async with session.get(f"{self.base_url}/healthz") as response:
                        if response.status == 200:
                            return self
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def requests(self) -> list[Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.get(f"{self.base_url}/requests") as response,
        ):
            body = await response.json()
        assert body["dropped"] == 0, "fake-edrone dropped records: raise max_records"
        return [SimpleNamespace(**record) for record in body["requests"]]

    async def wait_for(self, count: int, timeout_s: float) -> None:
        """Until it has received ``count`` requests."""

        async def received() -> bool:
            return await self.count() >= count

        await wait_until(received, timeout_s)

    async def count(self) -> int:
        """How many requests it has received (cheap: no records)."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"{self.base_url}/requests", params={"since": "1000000000"}) as response,
        ):
            return int((await response.json())["next"])
