"""The ingress application factory and its server loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from bridge.amqp import connect, declare_topology
from bridge.config import Settings
from bridge.ingress.allowlist import source_allowlist
from bridge.ingress.handlers import healthz, readyz, update_subscriber_status
from bridge.ingress.state import METRICS, SETTINGS, STATE, IngressState
from bridge.metrics import Metrics, metrics_handler
from bridge.publisher import ConfirmedPublisher
from bridge.webhook import WebhookRejected

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is a JSON body that names the problem; nothing was published."""
    try:
        return await handler(request)
    except WebhookRejected as exc:
        log.info("webhook_rejected", status=exc.status, error=exc.error, detail=exc.detail)
        request.app[METRICS].webhooks_rejected.labels(exc.error).inc()
        return web.json_response({"error": exc.error, "detail": exc.detail}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        error = exc.reason.lower().replace(" ", "_")
        request.app[METRICS].webhooks_rejected.labels(error).inc()
        return web.json_response(
            {"error": error, "detail": exc.reason}, status=exc.status, headers=headers
        )


async def amqp_context(app: web.Application) -> AsyncIterator[None]:
    """The broker connection and the confirmed publisher, for the app's lifetime."""
    settings = app[SETTINGS]
    connection = await connect(settings, "ingress")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare_topology(channel, settings)
        app[STATE].publisher = ConfirmedPublisher(channel, exchange, settings.publish_timeout_s)
        yield
    finally:
        await connection.close()


def create_app(
    settings: Settings,
    *,
    publisher: ConfirmedPublisher | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The ingress app; with ``publisher`` given, it uses that instead of connecting itself;
    ``metrics`` is the process's (``run`` shares one between its parts)."""
    middlewares: list[Middleware] = [json_errors]
    if settings.ingress_allowed_networks:
        # Outermost, so that a refused source reaches nothing else, not even the body read.
        middlewares.insert(
            0, source_allowlist(settings.ingress_allowed_networks, settings.ingress_trusted_proxies)
        )
    app = web.Application(
        # One byte over the limit is enough to tell that a body is too large.
        client_max_size=settings.max_body_bytes,
        middlewares=middlewares,
        # The parser's limits, so an oversized request line or header is a 400 from the parser.
        handler_args={
            "max_line_size": settings.max_request_line_bytes,
            "max_field_size": settings.max_header_bytes,
            "max_headers": settings.max_headers,
        },
    )
    app[SETTINGS] = settings
    app[STATE] = IngressState(publisher=publisher)
    app[METRICS] = metrics if metrics is not None else Metrics()
    if publisher is None:
        app.cleanup_ctx.append(amqp_context)
    app.add_routes(
        [
            web.post(settings.webhook_path, update_subscriber_status),
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
    ``reuse_port`` lets the other ingress workers listen on the same port."""
    app = create_app(settings, metrics=metrics)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_s, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port, reuse_port=reuse_port)
        await site.start()
        log.info("ingress_listening", host=settings.http_host, port=settings.http_port)
        await stopping.wait()
        # Answer 503 to what still arrives, before the channel closes under it.
        app[STATE].draining = True
        log.info("ingress_stopping")
    finally:
        await runner.cleanup()
