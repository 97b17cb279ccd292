"""Slow, idle and surplus connections against the real ``serve()`` and the real broker, by raw
sockets: each is cut within its timeout and counted, nothing it sent is published, and normal
webhooks keep their latency meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlencode

import aio_pika
import aiohttp
import pytest

from bridge.config import Settings
from bridge.devtools.simulate import Summary, build_webhook, send_webhooks
from bridge.ingress.app import serve
from bridge.ingress.guard import LINGERING_TIME_S, SWEEP_INTERVAL_S
from bridge.metrics import Metrics
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.cli import closed_port
from tests.support.webhooks import queued, webhooks_in

HOST = "127.0.0.1"
# Beyond its timeout, a cut may wait for the sweeper's next round and a loaded loop.
MARGIN_S = SWEEP_INTERVAL_S + 0.75
FORM = "application/x-www-form-urlencoded"


@dataclass
class Ingress:
    settings: Settings
    metrics: Metrics

    @property
    def port(self) -> int:
        return self.settings.http_port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.settings.webhook_path}"

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"edrone_bridge_{name}", labels) or 0.0

    def cuts(self, reason: str) -> float:
        return self.sample("ingress_connections_cut_total", reason=reason)

    def open_connections(self) -> float:
        return self.sample("ingress_connections")


@pytest.fixture
async def start_ingress(make_settings):
    """``async with start_ingress(**overrides) as ingress``: the real ``serve()`` on a port of
    its own, ready (its broker channel open) and with no connection left open by the check."""

    @contextlib.asynccontextmanager
    async def start(**overrides: object) -> AsyncIterator[Ingress]:
        settings = make_settings(http_host=HOST, http_port=closed_port(), **overrides)
        metrics = Metrics()
        stopping = asyncio.Event()
        task = asyncio.create_task(serve(settings, stopping, metrics))
        ingress = Ingress(settings, metrics)
        try:
            await wait_ready(ingress, task)
            yield ingress
        finally:
            stopping.set()
            async with asyncio.timeout(30):
                await task

    yield start


async def wait_ready(ingress: Ingress, task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(30):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                assert not task.done(), "serve() returned before it was ready"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://{HOST}:{ingress.port}/readyz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
        # The check's own connection is closed by now, or about to be.
        while ingress.open_connections():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def published(settings: Settings) -> int:
    """Webhooks in the subscriptions queue, a bundle counted by its webhooks; taken off it."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        return sum(len(webhooks_in(message)) for message in await queued(settings, connection))


async def read_to_end(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the server sends until it closes (EOF or reset), within ``timeout_s``."""
    received = bytearray()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


@dataclass
class Cut:
    answer: bytes
    after_s: float  # from the start of the client's clock to the server's close


async def slow_client(
    port: int, opening: bytes, *, drip_interval_s: float, timeout_s: float
) -> Cut:
    """Sends ``opening``, then one more byte every ``drip_interval_s`` until the server closes;
    the clock starts when ``opening`` is sent."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    writer.write(opening)
    started = time.monotonic()

    async def drip() -> None:
        while not writer.is_closing() and not reader.at_eof():
            await asyncio.sleep(drip_interval_s)
            with contextlib.suppress(ConnectionError):
                writer.write(b"a")
                await writer.drain()

    dripping = asyncio.create_task(drip())
    try:
        answer = await read_to_end(reader, timeout_s)
        return Cut(answer, time.monotonic() - started)
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def slow_head(settings: Settings) -> bytes:
    """A request line and one header; the rest of the head never comes."""
    return f"POST {settings.webhook_path} HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()


def slow_body(settings: Settings, length: int = 1000) -> bytes:
    """A whole head announcing ``length`` bytes of body, and the first few of them."""
    head = (
        f"POST {settings.webhook_path} HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Type: {FORM}\r\nContent-Length: {length}\r\n\r\n"
    )
    return head.encode() + b"email="


def healthz_request(*, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n{connection}\r\n".encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def json_of(answer: bytes) -> dict[str, str]:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def percentiles(summary: Summary) -> tuple[float, float]:
    return summary.percentile_ms(50), summary.percentile_ms(99)


def webhooks(count: int) -> list[dict[str, str]]:
    return [build_webhook("NATIVE_5", TEST_APP_ID, TEST_SECRET) for _ in range(count)]


class TestSlowHead:
    async def test_a_dripped_head_is_cut_with_408_and_counted(self, measured, start_ingress):
        """A head dripped a byte at a time is answered 408 and closed once head_timeout has
        passed since its first byte, not before; the cut is counted as head_timeout."""
        async with start_ingress(http_head_timeout_s=1.0) as ingress:
            cut = await slow_client(
                ingress.port, slow_head(ingress.settings), drip_interval_s=0.2, timeout_s=10
            )
            assert status_of(cut.answer) == 408, cut.answer
            assert b"Connection: close" in cut.answer
            assert json_of(cut.answer)["error"] == "head_timeout"
            assert 1.0 - SWEEP_INTERVAL_S <= cut.after_s <= 1.0 + MARGIN_S
            assert ingress.cuts("head_timeout") == 1
            measured(f"[slow clients] slow head cut after {cut.after_s:.2f} s (timeout 1.0 s)")

    async def test_a_silent_connection_is_closed_after_head_timeout(self, start_ingress):
        """A connection that never sends a byte is closed, without an answer, head_timeout
        after it was made."""
        async with start_ingress(http_head_timeout_s=1.0) as ingress:
            reader, writer = await asyncio.open_connection(HOST, ingress.port)
            started = time.monotonic()
            answer = await read_to_end(reader, 10)
            elapsed = time.monotonic() - started
            writer.close()
            assert answer == b""
            assert 1.0 - SWEEP_INTERVAL_S <= elapsed <= 1.0 + MARGIN_S
            assert ingress.cuts("head_timeout") == 1


class TestSlowBody:
    async def test_a_short_body_gets_408_is_cut_and_publishes_nothing(
        self, measured, start_ingress
    ):
        """A body shorter than its Content-Length, dripped, gets 408 body_timeout once
        body_timeout has passed, the connection is closed right after (aiohttp lingers
        LINGERING_TIME_S at most, not its default 10 s), the cut is counted, nothing is
        published."""
        async with start_ingress(http_body_timeout_s=1.0) as ingress:
            cut = await slow_client(
                ingress.port, slow_body(ingress.settings), drip_interval_s=0.2, timeout_s=15
            )
            assert status_of(cut.answer) == 408, cut.answer
            assert b"Connection: close" in cut.answer
            assert json_of(cut.answer)["error"] == "body_timeout"
            assert 1.0 <= cut.after_s <= 1.0 + LINGERING_TIME_S + MARGIN_S
            assert ingress.cuts("body_timeout") == 1
            assert ingress.sample("webhooks_rejected_total", reason="body_timeout") == 1
            assert await published(ingress.settings) == 0
            measured(
                f"[slow clients] slow body closed after {cut.after_s:.2f} s "
                f"(timeout 1.0 s + lingering {LINGERING_TIME_S} s)"
            )

    async def test_a_stalled_body_is_closed_too(self, start_ingress):
        """A body that stops short of its Content-Length and sends nothing more gets the same
        408 and close: the bound is on the whole body, not on the gap between bytes."""
        async with start_ingress(http_body_timeout_s=1.0) as ingress:
            cut = await slow_client(
                ingress.port, slow_body(ingress.settings), drip_interval_s=3600, timeout_s=15
            )
            assert status_of(cut.answer) == 408, cut.answer
            assert cut.after_s <= 1.0 + LINGERING_TIME_S + MARGIN_S
            assert await published(ingress.settings) == 0


class TestIdle:
    async def test_an_idle_keep_alive_connection_is_closed(self, measured, start_ingress):
        """A keep-alive connection is served while requests keep coming, and closed (and
        counted as idle_timeout) once idle_timeout passes without a new request byte."""
        async with start_ingress(http_idle_timeout_s=1.0) as ingress:
            reader, writer = await asyncio.open_connection(HOST, ingress.port)
            request = healthz_request()
            try:
                for _ in range(3):  # each within the idle timeout of the previous answer
                    writer.write(request)
                    async with asyncio.timeout(5):
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = int(head.lower().split(b"content-length: ")[1].split(b"\r")[0])
                        await reader.readexactly(length)
                    assert status_of(head) == 200
                    answered = time.monotonic()
                    await asyncio.sleep(0.6)
                rest = await read_to_end(reader, 10)
                idle_s = time.monotonic() - answered
            finally:
                writer.close()
            assert rest == b""
            assert 1.0 - SWEEP_INTERVAL_S <= idle_s <= 1.0 + MARGIN_S
            assert ingress.cuts("idle_timeout") == 1
            measured(f"[slow clients] idle connection closed after {idle_s:.2f} s (timeout 1.0 s)")


class TestConnectionCap:
    async def test_over_the_cap_a_new_connection_gets_503_and_the_others_keep_working(
        self, measured, start_ingress
    ):
        """With http_max_connections open, one more connection is answered 503 with
        Retry-After and closed at once; the open ones are still served afterwards."""
        async with start_ingress(http_max_connections=5, http_head_timeout_s=30) as ingress:
            held = [await asyncio.open_connection(HOST, ingress.port) for _ in range(5)]
            try:
                async with asyncio.timeout(5):
                    while ingress.open_connections() < 5:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                started = time.monotonic()
                reader, writer = await asyncio.open_connection(HOST, ingress.port)
                writer.write(healthz_request())
                answer = await read_to_end(reader, 5)
                refused_s = time.monotonic() - started
                writer.close()
                assert status_of(answer) == 503, answer
                assert f"Retry-After: {ingress.settings.retry_after_s}".encode() in answer
                assert b"Connection: close" in answer
                assert json_of(answer)["error"] == "unavailable"
                assert refused_s < 0.5
                assert ingress.cuts("too_many_connections") == 1
                for held_reader, held_writer in held:
                    held_writer.write(healthz_request(close=True))
                    assert status_of(await read_to_end(held_reader, 5)) == 200
            finally:
                for _, held_writer in held:
                    held_writer.close()
            measured(f"[slow clients] connection over the cap refused in {refused_s * 1000:.1f} ms")


def expect_head(settings: Settings, length: int, *, expect: str = "100-continue") -> bytes:
    return (
        f"POST {settings.webhook_path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {FORM}\r\n"
        f"Content-Length: {length}\r\nExpect: {expect}\r\n\r\n"
    ).encode()


class TestExpectContinue:
    async def test_a_body_over_the_limit_is_refused_without_100_continue(self, start_ingress):
        """``Expect: 100-continue`` with a Content-Length of 100 MB gets 413 body_too_large at
        once, never ``100 Continue``; it is counted as a rejection and the connection closes."""
        async with start_ingress() as ingress:
            reader, writer = await asyncio.open_connection(HOST, ingress.port)
            writer.write(expect_head(ingress.settings, 100_000_000))
            answer = await read_to_end(reader, 10)
            writer.close()
            assert b"100 Continue" not in answer
            assert status_of(answer) == 413, answer
            assert json_of(answer)["error"] == "body_too_large"
            assert ingress.sample("webhooks_rejected_total", reason="body_too_large") == 1
            assert await published(ingress.settings) == 0

    async def test_a_small_body_is_invited_then_accepted(self, start_ingress):
        """``Expect: 100-continue`` with a small body gets ``100 Continue``, then the body is
        read and the webhook accepted (200) and published."""
        async with start_ingress() as ingress:
            body = urlencode(webhooks(1)[0]).encode()
            reader, writer = await asyncio.open_connection(HOST, ingress.port)
            try:
                writer.write(expect_head(ingress.settings, len(body)))
                async with asyncio.timeout(5):
                    interim = await reader.readuntil(b"\r\n\r\n")
                assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(body)
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                assert status_of(head) == 200, head
            finally:
                writer.close()
            assert await published(ingress.settings) == 1

    async def test_a_refused_source_is_not_invited(self, start_ingress):
        """A source outside ingress_allowed_networks with ``Expect: 100-continue`` gets 403
        forbidden_source and no ``100 Continue``."""
        async with start_ingress(ingress_allowed_networks="203.0.113.0/24") as ingress:
            reader, writer = await asyncio.open_connection(HOST, ingress.port)
            writer.write(expect_head(ingress.settings, 500))
            answer = await read_to_end(reader, 10)
            writer.close()
            assert b"100 Continue" not in answer
            assert status_of(answer) == 403, answer
            assert json_of(answer)["error"] == "forbidden_source"


class TestUnderSlowClients:
    async def test_300_slow_clients_are_cut_and_normal_webhooks_keep_their_latency(
        self, measured, start_ingress
    ):
        """With 150 slow-head and 150 slow-body clients connected, signed webhooks are all
        accepted with a p99 latency within max(3x, +100 ms) of the same measurement without
        them; every slow client is cut within its timeout plus a margin and counted, and
        nothing any of them sent is published."""
        timeout_s, count, concurrency = 2.0, 300, 4
        async with start_ingress(
            http_head_timeout_s=timeout_s, http_body_timeout_s=timeout_s
        ) as ingress:
            await send_webhooks(ingress.url, webhooks(50), concurrency=concurrency)  # warm-up
            baseline = await send_webhooks(ingress.url, webhooks(count), concurrency=concurrency)

            opened = time.monotonic()
            clients = [
                asyncio.create_task(
                    slow_client(
                        ingress.port,
                        opening(ingress.settings),
                        drip_interval_s=0.5,
                        timeout_s=timeout_s + 10,
                    )
                )
                for opening in [slow_head] * 150 + [slow_body] * 150
            ]
            async with asyncio.timeout(timeout_s):
                while ingress.open_connections() < 300:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            connected_s = time.monotonic() - opened
            loaded = await send_webhooks(ingress.url, webhooks(count), concurrency=concurrency)
            still_open = ingress.open_connections()
            cuts = await asyncio.gather(*clients)

            head_cuts, body_cuts = cuts[:150], cuts[150:]
            slowest_head = max(cut.after_s for cut in head_cuts)
            slowest_body = max(cut.after_s for cut in body_cuts)
            soonest = min(cut.after_s for cut in cuts)
            (base_p50, base_p99), (load_p50, load_p99) = percentiles(baseline), percentiles(loaded)
            measured(
                f"[slow clients] {count} webhooks at concurrency {concurrency}: "
                f"baseline p50 {base_p50:.1f} ms p99 {base_p99:.1f} ms; "
                f"beside 300 slow clients p50 {load_p50:.1f} ms p99 {load_p99:.1f} ms; "
                f"300 slow clients connected in {connected_s:.2f} s, {still_open:.0f} "
                f"connections still open after the measurement; cuts: "
                f"head_timeout {ingress.cuts('head_timeout'):.0f} "
                f"(slowest {slowest_head:.2f} s), body_timeout {ingress.cuts('body_timeout'):.0f} "
                f"(slowest {slowest_body:.2f} s), soonest cut {soonest:.2f} s, "
                f"timeouts {timeout_s} s"
            )
            assert baseline.outcomes == {"200": count}
            assert loaded.outcomes == {"200": count}
            assert still_open >= 300, "the slow clients were cut before the measurement ended"
            assert load_p99 <= max(3 * base_p99, base_p99 + 100)
            assert all(status_of(cut.answer) == 408 for cut in cuts)
            assert soonest >= timeout_s - SWEEP_INTERVAL_S
            assert slowest_head <= timeout_s + MARGIN_S
            assert slowest_body <= timeout_s + LINGERING_TIME_S + MARGIN_S
            assert ingress.cuts("head_timeout") == 150
            assert ingress.cuts("body_timeout") == 150
            assert await published(ingress.settings) == 50 + 2 * count
