"""Prometheus metrics of one process: defined once here, registered in a registry of the process's
own (no global state), exposed on ``/metrics``."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from bridge.config import Settings, metrics_port

log = structlog.get_logger(__name__)

# Latencies of a publish confirm or a database commit on one machine: milliseconds, rarely more.
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BUNDLE_BUCKETS = (1, 2, 3, 5, 10, 25, 50, 100, 250, 1000)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def _counter(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Counter:
    return Counter(name, doc, labels, namespace="edrone_bridge", registry=registry)


def _gauge(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Gauge:
    return Gauge(name, doc, labels, namespace="edrone_bridge", registry=registry)


def _histogram(
    registry: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...], *labels: str
) -> Histogram:
    return Histogram(
        name, doc, labels, namespace="edrone_bridge", buckets=buckets, registry=registry
    )


class Metrics:
    """Every metric the bridge exports, in a registry of its own. Labels never carry secrets,
    addresses or event ids: only app ids, queue names, channels, outcomes and reasons."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        # The ingress
        self.webhooks_received = _counter(r, "webhooks_received", "Webhook requests")
        self.webhooks_accepted = _counter(
            r, "webhooks_accepted", "Webhooks confirmed by the broker", "channel"
        )
        self.webhooks_rejected = _counter(
            r, "webhooks_rejected", "Webhooks answered other than 200, by reason", "reason"
        )
        self.publish_confirm_seconds = _histogram(
            r, "publish_confirm_seconds", "From publish to the broker's confirm", _FAST_BUCKETS
        )
        self.ingress_bundle_webhooks = _histogram(
            r,
            "ingress_bundle_webhooks",
            "Webhooks per confirmed broker message (1: alone; more: a bundle)",
            _BUNDLE_BUCKETS,
        )
        self.ingress_connections = _gauge(
            r, "ingress_connections", "HTTP connections open to this ingress process"
        )
        self.ingress_connections_cut = _counter(
            r,
            "ingress_connections_cut",
            "HTTP connections closed or refused for being slow, idle or too many, by reason",
            "reason",
        )
        # The consumers
        self.events = _counter(
            r, "events", "Messages handled, by queue and outcome", "queue", "outcome"
        )
        self.batch_size = _histogram(
            r, "batch_size", "Messages per handled batch", _BATCH_BUCKETS, "queue"
        )
        self.batch_seconds = _histogram(
            r,
            "batch_seconds",
            "Handling one batch (its commit, or its trace calls)",
            _FAST_BUCKETS,
            "queue",
        )
        self.batch_retries = _counter(
            r, "batch_retries", "Batches handled again after an error", "queue"
        )
        self.retries = _counter(r, "retries", "Messages sent to a retry tier", "queue", "tier")
        self.dead_lettered = _counter(r, "dead_lettered", "Messages dead-lettered", "queue")
        self.batch_splits = _counter(
            r,
            "batch_splits",
            "Failing batches split in halves to find the message that fails them",
            "queue",
        )
        self.bundle_parts_resent = _counter(
            r,
            "bundle_parts_resent",
            "Webhooks of a redelivered bundle sent back to their queue one message each",
            "queue",
        )
        self.dates_clamped = _counter(
            r,
            "dates_clamped",
            "Changes dated later than their receipt plus the clock skew, ordered as if not",
            "queue",
        )
        # The trace forwarder
        self.traces = _counter(r, "traces", "Trace calls to edrone by outcome", "outcome")
        self.rate_limit_waits = _counter(
            r, "rate_limit_waits", "Trace calls that waited for the rate limit", "app_id"
        )
        self.rate_limit_wait_seconds = _counter(
            r, "rate_limit_wait_seconds", "Time trace calls waited for the rate limit", "app_id"
        )
        # Queues and connections, sampled
        self.queue_messages = _gauge(r, "queue_messages", "Messages ready in a queue", "queue")
        self.queue_consumers = _gauge(r, "queue_consumers", "Consumers of a queue", "queue")
        self.queue_oldest_message_age_seconds = _gauge(
            r,
            "queue_oldest_message_age_seconds",
            "Age of the oldest message in a queue (work queues: of those this process holds)",
            "queue",
        )
        self.relay_rows = _counter(
            r,
            "relay_rows",
            "Outbox rows the relay handled: published, coalesced, invalid, set_aside",
            "outcome",
        )
        self.drift_addresses = _gauge(
            r,
            "drift_addresses",
            "Addresses where the shop's table and the sync state differ, by app and kind "
            "(the scheduled drift check, as `reconcile` finds them)",
            "app_id",
            "kind",
        )
        self.broker_connected = _gauge(r, "broker_connected", "1 while connected to RabbitMQ")
        self.database_connected = _gauge(r, "database_connected", "1 while PostgreSQL answers")

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A ``GET /metrics`` handler in Prometheus' text format."""

    async def handle(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    return handle


def observability_app(metrics: Metrics, not_ready: Callable[[], str | None]) -> web.Application:
    """``/metrics``, ``/healthz`` and ``/readyz`` for a process that serves no other HTTP;
    ``not_ready`` says why the process is not ready, or None when it is."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reason = not_ready()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    app = web.Application()
    app.add_routes(
        [
            web.get("/metrics", metrics_handler(metrics)),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
        ]
    )
    return app


@asynccontextmanager
async def serving(
    app: web.Application, host: str, port: int, *, or_free: bool = False
) -> AsyncIterator[int]:
    """Serve ``app`` for the block; yields the bound port (``port`` 0 picks a free one). With
    ``or_free``, a ``port`` already taken (a second process of the same kind on the host) gives
    way to a free one, which the caller logs."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            if not or_free or exc.errno != errno.EADDRINUSE:
                raise
            await web.TCPSite(runner, host, 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@dataclass
class Readiness:
    """Why a process is not ready, for ``/readyz``: a reason set while it starts ("starting",
    "schema ... lacks migrations"), then the checks of what it serves with, in order."""

    reason: str | None = "starting"
    checks: list[Callable[[], str | None]] = field(default_factory=list)

    def waiting(self, reason: str | None) -> None:
        self.reason = reason

    def not_ready(self) -> str | None:
        if self.reason is not None:
            return self.reason
        return next((r for check in self.checks if (r := check()) is not None), None)


@asynccontextmanager
async def exposed(
    settings: Settings, metrics: Metrics, readiness: Readiness, command: str
) -> AsyncIterator[int]:
    """``/metrics``, ``/healthz`` and ``/readyz`` of ``command`` on its port (see
    ``bridge.config.metrics_port``), logged; yields the port."""
    port, or_free = metrics_port(settings, command)
    app = observability_app(metrics, readiness.not_ready)
    async with serving(app, settings.http_host, port, or_free=or_free) as bound:
        if bound != port and port:
            log.warning("metrics_port_taken", command=command, wanted=port, port=bound)
        log.info("metrics_listening", command=command, port=bound)
        yield bound
