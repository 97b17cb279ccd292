"""Bounds on slow, idle and surplus HTTP connections, kept below aiohttp: a request head must
arrive in time, an idle keep-alive connection is closed, and connections over a cap are refused."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from yarl import URL

from bridge.metrics import Metrics

log = structlog.get_logger(__name__)

CUT_REASONS = ("head_timeout", "body_timeout", "idle_timeout", "too_many_connections")
# One task checks every deadline this often, so that a request costs a few attribute writes
# instead of a timer of its own (the ingress's CPU per request is its bottleneck, benchmarks/).
SWEEP_INTERVAL_S = 0.25
# aiohttp reads and drops the rest of an unread body this long before it closes, so that a
# client still sending sees the answer rather than a reset; short, for a dripping client.
LINGERING_TIME_S = 1.0
# A cut connection whose peer does not take our last bytes is aborted after this.
FLUSH_GRACE_S = 1.0
# Connections that arrive together wait in the kernel's queue instead of retrying their SYN.
BACKLOG = 1024


class Phase(enum.Enum):
    HEAD = "head"  # waiting for a request head (or its rest): deadline head_timeout
    HANDLER = "handler"  # a handler runs and bounds its own reads: no deadline
    IDLE = "idle"  # answered; waiting for the next request's first byte: deadline idle_timeout
    CLOSING = "closing"  # answered over an unread body: aiohttp lingers, then closes
    CUT = "cut"  # closed by the guard; aborted if its last bytes never drain


def canned_response(status: HTTPStatus, error: str, detail: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with the ingress's JSON error body;
    ``headers`` are extra ``Name: value`` lines."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class GuardedConnection(asyncio.Protocol):
    """One connection: forwards every event to aiohttp's protocol and keeps its phase."""

    __slots__ = ("_guard", "_inner", "deadline", "phase", "started", "transport")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.HEAD
        self.deadline = math.inf
        # A byte of the awaited head has arrived (a head cut then gets a 408, not a bare close).
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # The first head is due head_timeout after the connection, bytes or none.
        self.deadline = time.monotonic() + self._guard.head_timeout_s
        self._guard.opened(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self.deadline = time.monotonic() + self._guard.head_timeout_s
        self.started = True
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.closed(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class Refusal(asyncio.Protocol):
    """A connection over the cap: a canned 503, closed at once, never seen by aiohttp."""

    __slots__ = ("_guard",)

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._guard.refusal)
        transport.close()
        self._guard.count_cut("too_many_connections", transport)


class ConnectionGuard:
    """Deadlines for every connection of one server, checked by one sweeper task.

    A connection waits for a head (``head_timeout_s`` from its first byte, or from the
    connection), runs a handler (no deadline here: the handler bounds its body read), then
    idles (``idle_timeout_s``). Beyond ``max_connections`` open at once, new ones get 503."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        head_timeout_s: float,
        idle_timeout_s: float,
        max_connections: int,
        retry_after_s: int,
    ) -> None:
        self.head_timeout_s = head_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self._metrics = metrics
        # Counted when a connection is admitted, before its transport exists, so that a burst
        # of accepts in one loop iteration cannot overshoot the cap.
        self._admitted = 0
        self._open: dict[asyncio.BaseTransport, GuardedConnection] = {}
        self.refusal = canned_response(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "unavailable",
            "too many connections; send again later",
            f"Retry-After: {retry_after_s}",
        )
        self._head_late = canned_response(
            HTTPStatus.REQUEST_TIMEOUT,
            "head_timeout",
            f"the request head did not arrive within {head_timeout_s:g} s",
        )
        for reason in CUT_REASONS:
            metrics.ingress_connections_cut.labels(reason)
        metrics.ingress_connections.set_function(lambda: len(self._open))

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory to serve with: ``factory``'s protocols, guarded."""

        def guarded() -> asyncio.Protocol:
            if self._admitted >= self.max_connections:
                return Refusal(self)
            self._admitted += 1
            return GuardedConnection(self, factory())

        return guarded

    def opened(self, connection: GuardedConnection) -> None:
        assert connection.transport is not None
        self._open[connection.transport] = connection

    def closed(self, connection: GuardedConnection) -> None:
        self._admitted -= 1
        if connection.transport is not None:
            self._open.pop(connection.transport, None)

    def connection_of(self, request: web.BaseRequest) -> GuardedConnection | None:
        transport = request.transport
        return None if transport is None else self._open.get(transport)

    def middleware(self) -> Middleware:
        """The outermost middleware: marks a connection as in its handler, then as answered."""

        @web.middleware
        async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
            connection = self.connection_of(request)
            if connection is None:
                return await handler(request)
            connection.phase = Phase.HANDLER
            connection.deadline = math.inf
            response: web.StreamResponse | None = None
            try:
                response = await handler(request)
                return response
            finally:
                self.answered(connection, request, response)

        return guarded

    def answered_early(self, request: web.Request, response: web.StreamResponse) -> None:
        """``response`` answers ``request`` before any middleware ran (an Expect refusal)."""
        connection = self.connection_of(request)
        if connection is not None:
            self.answered(connection, request, response)

    def answered(
        self,
        connection: GuardedConnection,
        request: web.Request,
        response: web.StreamResponse | None,
    ) -> None:
        if connection.phase is Phase.CUT:
            return
        connection.started = False
        if request.content.is_eof():
            connection.phase = Phase.IDLE
            connection.deadline = time.monotonic() + self.idle_timeout_s
            return
        # The body was not read (refused early, or it came too slowly): what aiohttp reads
        # while it lingers is no next head, and the connection then closes.
        connection.phase = Phase.CLOSING
        connection.deadline = time.monotonic() + LINGERING_TIME_S + FLUSH_GRACE_S
        if response is None:
            return
        response.force_close()
        if response.status == HTTPStatus.REQUEST_TIMEOUT:
            # read_fields answers 408 when the body did not arrive within its timeout.
            self.count_cut("body_timeout", connection.transport)

    async def sweep(self) -> None:
        """Cut the connections past their deadline, every :data:`SWEEP_INTERVAL_S`, forever."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for connection in [c for c in self._open.values() if c.deadline <= now]:
                try:
                    self.cut(connection, now)
                except Exception:
                    # One connection's failure must not stop the sweeping of all the others.
                    log.exception("connection_cut_failed")

    def cut(self, connection: GuardedConnection, now: float) -> None:
        transport = connection.transport
        assert transport is not None
        phase = connection.phase
        if phase is Phase.CUT:
            transport.abort()
            return
        connection.phase = Phase.CUT
        connection.deadline = now + FLUSH_GRACE_S
        if phase is Phase.HEAD:
            # Answer a head begun but not finished, unless an earlier answer is still going out.
            if connection.started and transport.get_write_buffer_size() == 0:
                transport.write(self._head_late)
            self.count_cut("head_timeout", transport)
        elif phase is Phase.IDLE:
            self.count_cut("idle_timeout", transport)
        # CLOSING: aiohttp should have closed it after lingering; no client was cut.
        transport.close()

    def count_cut(self, reason: str, transport: asyncio.BaseTransport | None) -> None:
        self._metrics.ingress_connections_cut.labels(reason).inc()
        peer = transport.get_extra_info("peername") if transport is not None else None
        log.info(
            "connection_cut",
            reason=reason,
            peer=peer[0] if isinstance(peer, tuple) else None,
            open_connections=len(self._open),
        )


class GuardedSite(web.BaseSite):
    """A TCP site serving through a :class:`ConnectionGuard` and running its sweeper;
    ``runner.cleanup()`` stops both, like any site."""

    __slots__ = ("_guard", "_host", "_port", "_reuse_port", "_sweeper")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        backlog: int = BACKLOG,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port once started (``port`` 0 picks a free one), else the one asked for."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        self._sweeper = asyncio.create_task(self._guard.sweep(), name="connection-sweeper")

    async def stop(self) -> None:
        await super().stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
