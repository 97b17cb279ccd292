"""An HTTP/1.1 load generator in a process of its own, so that it never shares the measured
server's event loop: keep-alive connections over plain asyncio streams (far cheaper per request
than a full client, which leaves the two cores to the server), pre-built signed NATIVE_5
webhooks, and either a closed loop (throughput at a concurrency) or an open loop (a fixed rate,
for latencies)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bridge.devtools.simulate import build_webhook

Request = tuple[str, bytes]  # event_id, the whole HTTP request


def build_requests(
    host: str, port: int, path: str, count: int, tag: str, app_id: str, secret: str
) -> list[Request]:
    """``count`` signed NATIVE_5 webhooks as JSON, each with the unique event id
    ``{tag}-{index:07d}``, as complete HTTP/1.1 keep-alive requests."""
    return list(iter_requests(host, port, path, count, tag, app_id, secret))


def iter_requests(
    host: str, port: int, path: str, count: int, tag: str, app_id: str, secret: str
) -> Iterator[Request]:
    """As :func:`build_requests`, each built only when it is taken (for long soaks)."""
    for index in range(count):
        event_id = f"{tag}-{index:07d}"
        fields = build_webhook("NATIVE_5", app_id, secret, event_id=event_id)
        body = json.dumps(fields).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        yield event_id, head + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> int:
    """Send one request and read its whole answer; the status code."""
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    start = lower.find(b"content-length:")
    if start >= 0:
        end = lower.index(b"\r\n", start)
        length = int(lower[start + 15 : end])
        if length:
            await reader.readexactly(length)
    return status


@dataclass
class Result:
    """Answers per status (or error name), timings, and per event the send and answer times."""

    statuses: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    # event_id -> (scheduled send time, answer time), time.monotonic(): system-wide on Linux.
    sent: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(n for status, n in self.statuses.items() if status.startswith("2"))

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def closed_loop(
    host: str, port: int, requests: list[Request], concurrency: int, timeout_s: float = 30.0
) -> Result:
    """Every request, ``concurrency`` connections each sending its next as soon as the last
    is answered; throughput over the whole run."""
    result = Result()
    pending = iter(requests)

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _, data in pending:
            started = time.perf_counter()
            try:
                status = await asyncio.wait_for(exchange(reader, writer, data), timeout_s)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                result.statuses[type(exc).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            result.statuses[str(status)] += 1
            result.latencies_s.append(time.perf_counter() - started)
        writer.close()

    connections = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in connections))
    result.elapsed_s = time.perf_counter() - started
    return result


async def open_loop(
    host: str,
    port: int,
    requests: Iterable[Request],
    rate_per_s: float,
    start_at: float,
    connections: int,
    timeout_s: float = 30.0,
    record: bool = True,
) -> Result:
    """Request ``i`` is due at ``start_at + i / rate_per_s`` (time.monotonic()), whatever the
    answers before it; a request that finds no idle connection waits for one, and that wait
    counts in its latency (no coordinated omission)."""
    result = Result()
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(host, port))
    tasks = set()

    async def send(event_id: str, data: bytes, due: float) -> None:
        reader, writer = await idle.get()
        try:
            status = str(await asyncio.wait_for(exchange(reader, writer, data), timeout_s))
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            status = type(exc).__name__
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
        done = time.monotonic()
        idle.put_nowait((reader, writer))
        result.statuses[status] += 1
        if record:
            result.latencies_s.append(done - due)
            result.sent[event_id] = (due, done)

    for index, (event_id, data) in enumerate(requests):
        due = start_at + index / rate_per_s
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(event_id, data, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    result.elapsed_s = time.monotonic() - start_at
    while not idle.empty():
        _, writer = idle.get_nowait()
        writer.close()
    return result


# --- the generator process ---------------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    # The generator's own speed matters only in that it leaves CPU to the server.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(conn: Connection) -> None:
    loop = _new_loop()
    requests: list[Request] = []
    try:
        while True:
            command, args = conn.recv()
            if command == "stop":
                return
            if command == "prepare":
                requests = build_requests(**args)
                conn.send(len(requests))
            elif command == "soak":
                lazy = iter_requests(**args.pop("build"))
                conn.send(loop.run_until_complete(open_loop(requests=lazy, record=False, **args)))
            elif command == "closed":
                conn.send(loop.run_until_complete(closed_loop(requests=requests, **args)))
            elif command == "open":
                conn.send(loop.run_until_complete(open_loop(requests=requests, **args)))
    finally:
        loop.close()


class LoadGenerator:
    """The generator process: ``prepare`` bodies (untimed), then run ``closed`` or ``open``."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name="loadgen", daemon=True)
        self.process.start()

    async def _call(self, command: str, **args: Any) -> Any:
        self._conn.send((command, args))
        return await asyncio.to_thread(self._conn.recv)

    async def prepare(self, **args: Any) -> int:
        return int(await self._call("prepare", **args))

    async def closed(self, **args: Any) -> Result:
        result: Result = await self._call("closed", **args)
        return result

    async def soak(self, **args: Any) -> Result:
        """An open loop over requests built as they go; nothing recorded per request."""
        result: Result = await self._call("soak", **args)
        return result

    async def open(self, **args: Any) -> Result:
        result: Result = await self._call("open", **args)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(("stop", {}))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
