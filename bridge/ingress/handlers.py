"""Request handlers: parse, verify, publish, answer; nothing else happens here."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import structlog
from aiohttp import web

from bridge.amqp import ROUTING_KEY_BY_CHANNEL
from bridge.ingress.body import parse_form, read_fields
from bridge.ingress.state import METRICS, SETTINGS, STATE
from bridge.ingress.webhook import verify_webhook
from bridge.publishing import PublishFailed

log = structlog.get_logger(__name__)


def unavailable(request: web.Request, detail: str) -> web.Response:
    """503 with Retry-After: edrone (or any caller) should send the same event again later."""
    retry_after = request.app[SETTINGS].retry_after_s
    return web.json_response(
        {"error": "unavailable", "detail": detail},
        status=503,
        headers={"Retry-After": str(retry_after)},
    )


def not_stored(request: web.Request, detail: str) -> web.Response:
    request.app[METRICS].webhooks_rejected.labels("unavailable").inc()
    return unavailable(request, detail)


async def update_subscriber_status(request: web.Request) -> web.Response:
    """Answer 200 only once the broker has confirmed the event (docs/design.md promise 1)."""
    settings = request.app[SETTINGS]
    state = request.app[STATE]
    metrics = request.app[METRICS]
    metrics.webhooks_received.inc()
    if state.draining:
        return not_stored(request, "the ingress is shutting down")
    if state.bundler is None:
        return not_stored(request, "not connected to the broker")
    body = await read_fields(request, settings.max_body_bytes, settings.http_body_timeout_s)
    query = parse_form(request.rel_url.raw_query_string, "the query string")
    message, app = verify_webhook(
        body,
        query,
        settings.apps,
        datetime.now(UTC),
        date_floor=settings.date_floor,
        phone_region=settings.phone_region,
    )
    with structlog.contextvars.bound_contextvars(
        app_id=message.app_id, event_id=message.event_id, channel=message.channel
    ):
        if not app.accepts_status(message.status):
            # The shop asked edrone for only some changes; never retry the others.
            log.info("webhook_filtered", sync=app.sync, status=message.status)
            metrics.webhooks_rejected.labels("filtered").inc()
            return web.json_response(
                {"status": "ignored", "reason": "filtered", "event_id": message.event_id}
            )
        started = time.perf_counter()
        try:
            await state.bundler.publish(
                message.model_dump_json().encode(),
                routing_key=ROUTING_KEY_BY_CHANNEL[message.channel],
                event_id=message.event_id,
            )
        except PublishFailed as exc:
            log.warning("webhook_not_published", error=str(exc))
            return not_stored(request, "the event could not be stored; send it again later")
        metrics.publish_confirm_seconds.observe(time.perf_counter() - started)
        metrics.webhooks_accepted.labels(message.channel).inc()
        # Debug, not info: a line per webhook cost a fifth of the ingress's CPU at thousands a
        # second (benchmarks/); webhooks_accepted_total on /metrics counts them.
        log.debug("webhook_accepted", protocol=message.protocol)
    return web.json_response({"status": "accepted", "event_id": message.event_id})


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: a webhook would be accepted now (broker channel open, not shutting down)."""
    state = request.app[STATE]
    if state.draining:
        return unavailable(request, "shutting down")
    if state.bundler is None or not state.bundler.ready:
        return unavailable(request, "no open channel to RabbitMQ")
    return web.json_response({"status": "ready"})
