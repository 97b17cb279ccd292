"""The ingress application factory and its server loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.typedefs import Middleware

from bridge.amqp import declare_topology
from bridge.broker import connect
from bridge.config import Settings
from bridge.ingress.allowlist import caller, source_allowlist
from bridge.ingress.body import too_large
from bridge.ingress.bundler import Bundler
from bridge.ingress.guard import LINGERING_TIME_S, SWEEP_INTERVAL_S, ConnectionGuard, GuardedSite
from bridge.ingress.handlers import healthz, readyz, update_subscriber_status
from bridge.ingress.state import METRICS, SETTINGS, STATE, IngressState
from bridge.ingress.webhook import WebhookRejected
from bridge.metrics import Metrics, metrics_handler
from bridge.publishing import ConfirmedPublisher
from bridge.starting import Stopped

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
# What the allow-list middleware's inner handler answers when it lets a request through.
_ADMITTED = web.Response(status=204)


def rejection(request: web.Request, exc: WebhookRejected) -> web.Response:
    """The JSON answer to a refused webhook, logged and counted; nothing was published."""
    log.info(
        "webhook_rejected",
        status=exc.status,
        error=exc.error,
        detail=exc.detail,
        caller=caller(request, request.app[SETTINGS].ingress_trusted_proxies),
    )
    request.app[METRICS].webhooks_rejected.labels(exc.error).inc()
    response = web.json_response({"error": exc.error, "detail": exc.detail}, status=exc.status)
    if request.content.exception() is not None:
        # A body that failed to decode (a gzip body that is no gzip, broken chunking): aiohttp
        # drops the connection once this answer is sent, when reading the rest of the body
        # fails again. Said in the answer, so that a client does not send its next request
        # into the dropped connection (it would fail with no answer).
        response.force_close()
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is a JSON body that names the problem; nothing was published."""
    try:
        return await handler(request)
    except WebhookRejected as exc:
        return rejection(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        error = exc.reason.lower().replace(" ", "_")
        request.app[METRICS].webhooks_rejected.labels(error).inc()
        return web.json_response(
            {"error": error, "detail": exc.reason}, status=exc.status, headers=headers
        )


async def _admitted(request: web.Request) -> web.StreamResponse:
    return _ADMITTED


def expect_continue(
    settings: Settings, allowlist: Middleware | None, guard: ConnectionGuard | None
) -> ExpectHandler:
    """The webhook route's answer to ``Expect: 100-continue``: a body that would be refused
    (over max_body_bytes by its Content-Length, or from a source outside the allow-list) is
    refused at once, never invited with ``100 Continue``."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        refusal: web.StreamResponse | None = None
        if allowlist is not None:
            answer = await allowlist(request, _admitted)
            refusal = None if answer is _ADMITTED else answer
        length = request.content_length
        if refusal is None and length is not None and length > settings.max_body_bytes:
            refusal = rejection(request, too_large(settings.max_body_bytes))
        if refusal is not None:
            # The client holds its body back: the connection cannot carry another request.
            refusal.force_close()
            if guard is not None:
                guard.answered_early(request, refusal)
            return refusal
        return await invite_body(request)

    return expect


async def invite_body(request: web.Request) -> web.StreamResponse | None:
    """What aiohttp's own expect handler does: ``100 Continue`` to HTTP/1.1, 417 for any other
    expectation."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        return rejection(
            request, WebhookRejected(417, "expectation_failed", f"unknown Expect: {expect!r}")
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim answer is no start of the response (aiohttp checks it before an error page).
    request.writer.output_size = 0
    return None


async def amqp_context(app: web.Application) -> AsyncIterator[None]:
    """The broker connection and the confirmed publisher, for the app's lifetime."""
    settings = app[SETTINGS]
    connection = await connect(settings, "ingress", stopping=app[STATE].stopping)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare_topology(channel, settings)
        publisher = ConfirmedPublisher(
            channel,
            exchange,
            settings.publish_timeout_s,
            connection=connection,
            on_return_raises=True,
        )
        app[STATE].bundler = bundler_for(publisher, settings, app[METRICS])
        yield
    finally:
        await connection.close()


def bundler_for(publisher: ConfirmedPublisher, settings: Settings, metrics: Metrics) -> Bundler:
    return Bundler(
        publisher,
        max_webhooks=settings.ingress_bundle_max,
        in_flight=settings.ingress_publishes_in_flight,
        timeout_s=settings.publish_timeout_s,
        on_confirmed=metrics.ingress_bundle_webhooks.observe,
    )


def create_app(
    settings: Settings,
    *,
    publisher: ConfirmedPublisher | None = None,
    metrics: Metrics | None = None,
    guard: ConnectionGuard | None = None,
) -> web.Application:
    """The ingress app; with ``publisher`` given, it uses that instead of connecting itself;
    ``metrics`` is the process's (``run`` shares one between its parts); ``guard`` is the
    server's, when it serves through one (``serve`` does; aiohttp's test server does not)."""
    middlewares: list[Middleware] = [json_errors]
    allowlist: Middleware | None = None
    if settings.ingress_allowed_networks:
        # Before the others, so that a refused source reaches nothing else, not even the body read.
        allowlist = source_allowlist(
            settings.ingress_allowed_networks, settings.ingress_trusted_proxies
        )
        middlewares.insert(0, allowlist)
    if guard is not None:
        # Outermost: every answer, refusals included, ends the connection's handler phase.
        middlewares.insert(0, guard.middleware())
    app = web.Application(
        # One byte over the limit is enough to tell that a body is too large.
        client_max_size=settings.max_body_bytes,
        middlewares=middlewares,
        # The parser's limits, so an oversized request line or header is a 400 from the parser.
        handler_args={
            "max_line_size": settings.max_request_line_bytes,
            "max_field_size": settings.max_header_bytes,
            "max_headers": settings.max_headers,
            # A backstop only, a little after the guard's own idle cut (which is counted).
            "keepalive_timeout": settings.http_idle_timeout_s + 2 * SWEEP_INTERVAL_S,
            # aiohttp's default of 10 s would let a client dripping a refused body keep its
            # connection that long after the answer.
            "lingering_time": LINGERING_TIME_S,
        },
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[STATE] = IngressState(
        bundler=bundler_for(publisher, settings, app[METRICS]) if publisher is not None else None
    )
    if publisher is None:
        app.cleanup_ctx.append(amqp_context)
    app.add_routes(
        [
            web.post(
                settings.webhook_path,
                update_subscriber_status(settings, app[METRICS]),
                expect_handler=expect_continue(settings, allowlist, guard),
            ),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_handler(app[METRICS])),
        ]
    )
    return app


async def serve(
    settings: Settings,
    stopping: asyncio.Event,
    metrics: Metrics | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    """Serve until ``stopping`` is set; then refuse new webhooks (503) and close gracefully.
    ``reuse_port`` lets the other ingress workers listen on the same port. Slow, idle and
    surplus connections are cut by a :class:`ConnectionGuard`."""
    metrics = metrics if metrics is not None else Metrics()
    guard = ConnectionGuard(
        metrics,
        head_timeout_s=settings.http_head_timeout_s,
        idle_timeout_s=settings.http_idle_timeout_s,
        max_connections=settings.http_max_connections,
        retry_after_s=settings.retry_after_s,
    )
    app = create_app(settings, metrics=metrics, guard=guard)
    app[STATE].stopping = stopping
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_s, access_log=None)
    try:
        await runner.setup()
    except Stopped:
        log.info("stopped_before_serving", part="ingress")
        return
    try:
        site = GuardedSite(
            runner, guard, settings.http_host, settings.http_port, reuse_port=reuse_port
        )
        await site.start()
        # The bound port: with http_port 0 the kernel picked it.
        log.info("ingress_listening", host=settings.http_host, port=site.port)
        await stopping.wait()
        # Answer 503 to what still arrives, before the channel closes under it.
        app[STATE].draining = True
        log.info("ingress_stopping")
    finally:
        await runner.cleanup()
