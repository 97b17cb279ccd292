"""The trace forwarder: the shop's subscription changes to edrone's trace API, paced, retried
through delay tiers and dead-lettered, never echoing edrone's own changes back."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import urlencode

import aiohttp
import asyncpg
import structlog
from aio_pika.abc import AbstractConnection
from pydantic import ValidationError

from bridge.amqp import declare_trace_topology, topology
from bridge.config import AppConfig, Settings, TraceSettings
from bridge.db import answers
from bridge.metrics import Metrics
from consumers import runtime
from consumers.edrone_state import SEND, decide, load_known, record_sent
from consumers.errors import Defer, Reject, database_retry, describe_validation_error
from consumers.runtime import APPLIED, Consumer, Delivery, Outcome
from consumers.service import serve_consumer
from consumers.throttle import Breaker, RateLimiter
from consumers.trace_form import bridge_version, trace_form
from schemas.fields import DATE_FLOOR_CONTEXT, DEFAULT_DATE_FLOOR, ordered_at
from schemas.platform_event import CustomerSubscriptionChanged

log = structlog.get_logger(__name__)

Sent = tuple[str, CustomerSubscriptionChanged, str | None]  # app_id, event, edrone's event id
COALESCED = "coalesced"  # a newer change of the same customer came in the same batch
# Answers after which the same request may well succeed (edrone-protocol.md §2: 429 and 5xx
# are undocumented but to be expected).
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_EXCERPT_CHARS = 300
_EDRONE_EVENT_ID = "x-edrone-event-id"
_FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def decode(
    body: bytes, apps: Mapping[str, AppConfig], date_floor: datetime = DEFAULT_DATE_FLOOR
) -> tuple[str, CustomerSubscriptionChanged]:
    """(app_id, event); :class:`Reject` when the message breaks the contract (or holds what
    PostgreSQL cannot store: it would fail every batch it is in)."""
    try:
        event = CustomerSubscriptionChanged.model_validate_json(
            body, context={DATE_FLOOR_CONTEXT: date_floor}
        )
    except ValidationError as exc:
        raise Reject(f"invalid platform event: {describe_validation_error(exc)}") from None
    app_id = event.app_id
    if app_id is None:
        if len(apps) != 1:
            raise Reject("platform event without app_id, and not exactly one app is configured")
        app_id = next(iter(apps))
    if app_id not in apps:
        raise Reject(f"unknown app_id {app_id!r}: not among the configured apps")
    return app_id, event


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds, from either of its forms (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


class TraceForwarder:
    """The batch handler: decode, coalesce, drop what edrone already knows, send the rest."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: asyncpg.Pool,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        options = settings.traces
        self._metrics = metrics if metrics is not None else Metrics()
        self._session = session
        self._pool = pool
        self._apps = settings.apps
        self._url = settings.trace_url
        self._options = options
        self._echo_window = timedelta(seconds=options.echo_window_s)
        self._date_floor = settings.date_floor
        self._clock_skew = settings.clock_skew
        self._queue = topology(settings).traces_queue
        self._version = bridge_version()
        self._slots = asyncio.Semaphore(options.concurrency)
        self._limiters: dict[str, RateLimiter] = {}
        self.breaker = Breaker(
            failures=options.breaker_failures,
            initial_pause_s=options.breaker_initial_pause_s,
            max_pause_s=options.breaker_max_pause_s,
        )
        self.rate_limit_waits = 0

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(deliveries)
        newest: dict[tuple[str, str], int] = {}
        decoded: dict[int, tuple[str, CustomerSubscriptionChanged]] = {}
        consumed_at = datetime.now(UTC)
        for index, delivery in enumerate(deliveries):
            try:
                app_id, event = decode(delivery.body, self._apps, self._date_floor)
            except Reject as exc:
                outcomes[index] = exc
                continue
            decoded[index] = target = (app_id, self._clamped(app_id, event, consumed_at))
            key = (target[0], target[1].email)
            # Several changes of one customer in a batch: only the newest is worth a call.
            previous = newest.get(key)
            if previous is None or _later(target[1], decoded[previous][1]):
                if previous is not None:
                    outcomes[previous] = COALESCED
                newest[key] = index
            else:
                outcomes[index] = COALESCED
        indices = list(newest.values())
        await self._forward([decoded[i] for i in indices], indices, outcomes)
        return [outcome if outcome is not None else APPLIED for outcome in outcomes]

    def _clamped(
        self, app_id: str, event: CustomerSubscriptionChanged, consumed_at: datetime
    ) -> CustomerSubscriptionChanged:
        """The event as ordered (newest wins) and told to edrone: dated no later than its
        consumption plus the clock skew, so that a shop clock gone wrong cannot freeze the
        address (promise 6)."""
        when = ordered_at(event.occurred_at, consumed_at, self._clock_skew)
        if when == event.occurred_at:
            return event
        log.warning(
            "occurred_at_clamped",
            app_id=app_id,
            event_id=event.event_id,
            occurred_at=event.occurred_at.isoformat(),
            ordered_at=when.isoformat(),
        )
        self._metrics.dates_clamped.labels(self._queue).inc()
        return event.model_copy(update={"occurred_at": when})

    async def _forward(
        self,
        targets: list[tuple[str, CustomerSubscriptionChanged]],
        indices: list[int],
        outcomes: list[Outcome | None],
    ) -> None:
        if not targets:
            return
        try:
            async with asyncio.timeout(self._options.db_timeout_s), self._pool.acquire() as conn:
                known = await load_known(conn, targets)
        except Exception as exc:
            # Nothing was sent yet, so the runtime may narrow a content error down to its
            # message by halves without calling edrone twice (promise 7).
            retry = database_retry(exc)
            if retry is None:
                raise
            raise retry from exc
        to_send: list[tuple[int, str, CustomerSubscriptionChanged]] = []
        for index, target, state in zip(indices, targets, known, strict=True):
            verdict = decide(target[1], state, self._echo_window)
            if verdict == SEND:
                to_send.append((index, *target))
            else:
                outcomes[index] = verdict
        results = await self._send_all(to_send)
        sent = []
        for (index, app_id, event), (outcome, edrone_id) in zip(to_send, results, strict=True):
            outcomes[index] = outcome
            if outcome == APPLIED:
                sent.append((app_id, event, edrone_id))
        await self._record(sent)

    async def _send_all(
        self, to_send: list[tuple[int, str, CustomerSubscriptionChanged]]
    ) -> list[tuple[Outcome, str | None]]:
        if not to_send:
            return []
        if self.breaker.probing:
            # edrone failed until a moment ago: one call tests the way before the others go,
            # and a failed test is not the message's fault.
            first = await self._send(*to_send[0][1:])
            if isinstance(first[0], Defer):
                first = (_paused(self.breaker.paused_for_s), None)
            rest = await asyncio.gather(*(self._send(app, ev) for _, app, ev in to_send[1:]))
            return [first, *rest]
        return list(await asyncio.gather(*(self._send(app, ev) for _, app, ev in to_send)))

    async def _send(
        self, app_id: str, event: CustomerSubscriptionChanged
    ) -> tuple[Outcome, str | None]:
        """One trace call and its outcome, with edrone's event id when it took it."""
        with structlog.contextvars.bound_contextvars(app_id=app_id, event_id=event.event_id):
            async with self._slots:
                paused_s = self.breaker.paused_for_s
                if paused_s > 0:
                    self._metrics.traces.labels("paused").inc()
                    return _paused(paused_s), None
                try:
                    encoded = self._encode(app_id, event)
                except Exception as exc:
                    # This message alone cannot be sent; failing the batch instead would call
                    # edrone again for every other message in it.
                    log.warning("trace_unencodable", error=repr(exc))
                    return Reject(f"cannot build the trace: {exc!r}"), None
                async with self._paced(app_id):
                    return await self._post(encoded)

    def _encode(self, app_id: str, event: CustomerSubscriptionChanged) -> bytes:
        form = trace_form(
            event,
            app_id,
            self._apps[app_id],
            platform=self._options.platform,
            platform_version=self._options.platform_version or self._version,
            version=self._version,
        )
        # Encoded here, exactly as aiohttp's FormData would, without its per-call machinery
        # (a tenth of the forwarder's CPU per trace, benchmarks/).
        return urlencode(form, doseq=True, encoding="utf-8").encode()

    async def _post(self, encoded: bytes) -> tuple[Outcome, str | None]:
        try:
            async with self._session.post(
                self._url, data=encoded, headers=_FORM_HEADERS
            ) as response:
                body = await response.text(errors="replace")
                status = response.status
                after_s = retry_after_s(response.headers.get("Retry-After"))
                edrone_id = response.headers.get(_EDRONE_EVENT_ID)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.breaker.failed()
            self._metrics.traces.labels("no_answer").inc()
            log.warning("trace_failed", error=repr(exc))
            return Defer(f"no answer from edrone: {exc!r}"), None
        answer = f"edrone answered {status}: {body[:_EXCERPT_CHARS]}"
        if 200 <= status < 300:
            self.breaker.succeeded()
            self._metrics.traces.labels("sent").inc()
            log.debug("trace_sent", edrone_event_id=edrone_id)
            return APPLIED, edrone_id
        if status in _RETRYABLE_STATUSES or status >= 500:
            self.breaker.failed()
            self._metrics.traces.labels("retryable_status").inc()
            log.warning("trace_retry", status=status)
            return Defer(answer, after_s=after_s), None
        # edrone is up and refuses this request for good: retrying cannot help.
        self.breaker.succeeded()
        self._metrics.traces.labels("refused").inc()
        log.warning("trace_refused", status=status)
        return Reject(answer), None

    async def database_answers(self) -> bool:
        """The runtime's probe (``ConsumerSpec.probe``): is a failed batch the database's?"""
        return await answers(self._pool, min(self._options.db_timeout_s, 5.0))

    @asynccontextmanager
    async def _paced(self, app_id: str) -> AsyncIterator[None]:
        """Within the app's rate limit, for the whole call (see RateLimiter)."""
        limiter = self._limiter(app_id)
        if limiter is None:
            yield
            return
        async with limiter.slot() as waited_s:
            if waited_s > 0:
                self.rate_limit_waits += 1
                self._metrics.rate_limit_waits.labels(app_id).inc()
                self._metrics.rate_limit_wait_seconds.labels(app_id).inc(waited_s)
            yield

    def _limiter(self, app_id: str) -> RateLimiter | None:
        rate = self._apps[app_id].rate_limit_per_s or self._options.rate_limit_per_s
        if not rate:
            return None
        if app_id not in self._limiters:
            self._limiters[app_id] = RateLimiter(rate)
        return self._limiters[app_id]

    async def _record(
        self, sent: list[tuple[str, CustomerSubscriptionChanged, str | None]]
    ) -> None:
        # The calls are made: a failure here, whatever it is, only costs a later no-op check, so
        # it must not fail the batch (its retry, or its halves, would call edrone again).
        try:
            async with asyncio.timeout(self._options.db_timeout_s), self._pool.acquire() as conn:
                await record_sent(conn, sent)
        except Exception as exc:
            log.warning("trace_state_not_recorded", count=len(sent), error=repr(exc))


def _paused(paused_s: float) -> Defer:
    # Not the message's fault: this retry does not use up a tier.
    return Defer("edrone is failing; sending paused", after_s=paused_s, counts=False)


def _later(a: CustomerSubscriptionChanged, b: CustomerSubscriptionChanged) -> bool:
    return (a.occurred_at, a.event_id) > (b.occurred_at, b.event_id)


def create_session(settings: Settings) -> aiohttp.ClientSession:
    """A keep-alive session to edrone, bounded by the configured timeouts."""
    options = settings.traces
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=options.timeout_s, connect=options.connect_timeout_s),
        connector=aiohttp.TCPConnector(limit=options.concurrency),
        raise_for_status=False,
    )


def batch_timeout_s(options: TraceSettings) -> float:
    """Enough for a whole batch of the slowest answers, queued behind the concurrency bound and
    the rate limit: a batch timed out is sent again, and edrone would hear twice."""
    rounds = math.ceil(options.batch_size / options.concurrency)
    pacing_s = options.batch_size / options.rate_limit_per_s if options.rate_limit_per_s else 0.0
    return rounds * options.timeout_s + pacing_s + 10.0


def create_consumer(
    connection: AbstractConnection,
    forwarder: TraceForwarder,
    settings: Settings,
    metrics: Metrics | None = None,
) -> Consumer:
    """The trace consumer, configured from ``settings.traces``, with its retry tiers."""
    return runtime.create_consumer(
        connection,
        queue=topology(settings).traces_queue,
        handler=forwarder,
        options=settings.traces,
        topology=topology(settings),
        timeout_s=batch_timeout_s(settings.traces),
        publish_timeout_s=settings.publish_timeout_s,
        retry_tiers_s=settings.traces.retry_tiers_s,
        metrics=metrics,
        probe=forwarder.database_answers,
    )


async def serve(
    settings: Settings,
    stopping: asyncio.Event,
    metrics: Metrics | None = None,
    *,
    expose_metrics: bool = True,
) -> None:
    """Forward the shop's changes until ``stopping`` is set, then drain and close
    (``edrone-bridge consume traces``; migrations are the CLI's job)."""
    names = topology(settings)

    @asynccontextmanager
    async def build(
        connection: AbstractConnection, pool: asyncpg.Pool, metrics: Metrics
    ) -> AsyncIterator[Consumer]:
        async with create_session(settings) as session:
            forwarder = TraceForwarder(session, pool, settings, metrics)
            async with create_consumer(connection, forwarder, settings, metrics) as consumer:
                yield consumer

    await serve_consumer(
        settings,
        stopping,
        name="consume traces",
        declare=declare_trace_topology,
        build=build,
        drain_timeout_s=settings.traces.drain_timeout_s,
        metrics=metrics,
        expose_metrics=expose_metrics,
        dead_letter_queues=[names.dead_letter_queue(names.traces_queue)],
        other_queues=names.retry_queues(settings.traces.retry_tiers_s),
    )
