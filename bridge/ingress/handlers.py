"""Request handlers: parse, verify, publish, answer; nothing else happens here."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from aiohttp import web

from bridge.amqp import ROUTING_KEY_BY_CHANNEL
from bridge.config import Settings
from bridge.ingress.body import parse_form, read_fields
from bridge.ingress.state import METRICS, SETTINGS, STATE
from bridge.ingress.webhook import verify_webhook
from bridge.metrics import Metrics
from bridge.publishing import PublishFailed

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.Response]]
CHANNELS = tuple(ROUTING_KEY_BY_CHANNEL)


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


def update_subscriber_status(settings: Settings, metrics: Metrics) -> Handler:
    """The webhook route: answer 200 only once the broker has confirmed the event
    (docs/design.md promise 1). What every request reads is looked up here, once (benchmarks/:
    the ingress's CPU per webhook is the figure that bounds it)."""
    apps, date_floor, region = settings.apps, settings.date_floor, settings.phone_region
    limit, body_timeout_s = settings.max_body_bytes, settings.http_body_timeout_s
    received = metrics.webhooks_received
    filtered = metrics.webhooks_rejected.labels("filtered")
    confirm_seconds = metrics.publish_confirm_seconds
    accepted = {channel: metrics.webhooks_accepted.labels(channel) for channel in CHANNELS}

    async def handle(request: web.Request) -> web.Response:
        received.inc()
        state = request.app[STATE]
        if state.draining:
            return not_stored(request, "the ingress is shutting down")
        if state.bundler is None:
            return not_stored(request, "not connected to the broker")
        body = await read_fields(request, limit, body_timeout_s)
        raw_query = request.rel_url.raw_query_string
        query = parse_form(raw_query, "the query string") if raw_query else {}
        message, app = verify_webhook(
            body, query, apps, datetime.now(UTC), date_floor=date_floor, phone_region=region
        )
        # Named in each line rather than bound to the context: binding costs every request,
        # and only the rare lines below log.
        event = {"app_id": message.app_id, "event_id": message.event_id}
        if not app.accepts_status(message.status):
            # The shop asked edrone for only some changes; never retry the others.
            log.info(
                "webhook_filtered",
                **event,
                channel=message.channel,
                sync=app.sync,
                status=message.status,
            )
            filtered.inc()
            return answer(b'{"status":"ignored","reason":"filtered","event_id":', message.event_id)
        started = time.perf_counter()
        try:
            await state.bundler.publish(
                message.model_dump_json().encode(),
                routing_key=ROUTING_KEY_BY_CHANNEL[message.channel],
                event_id=message.event_id,
            )
        except PublishFailed as exc:
            log.warning("webhook_not_published", **event, channel=message.channel, error=str(exc))
            return not_stored(request, "the event could not be stored; send it again later")
        confirm_seconds.observe(time.perf_counter() - started)
        accepted[message.channel].inc()
        # No line per accepted webhook: one cost a fifth of the ingress's CPU at thousands a
        # second (benchmarks/); webhooks_accepted_total on /metrics counts them.
        return answer(b'{"status":"accepted","event_id":', message.event_id)

    return handle


def answer(start: bytes, event_id: str) -> web.Response:
    """A 200 JSON answer that ends with the event_id: built from bytes, not a dict to dump."""
    return web.Response(
        body=start + json.dumps(event_id).encode() + b"}", content_type="application/json"
    )


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
