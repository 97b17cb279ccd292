"""The trace forwarder: the shop's subscription changes to edrone's trace API, paced, retried
through delay tiers and dead-lettered; what to tell edrone is decided from the sync state, so
an echo of the bridge's own change is never sent back and edrone is brought to the winner."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlencode

import aiohttp
import asyncpg
import structlog
from aio_pika.abc import AbstractConnection
from pydantic import ValidationError

from bridge import bridge_version
from bridge.amqp import declare_trace_topology, topology
from bridge.app_config import AppConfig
from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.shop_table import ShopTarget, resolve_targets
from consumers.convergence import RECONCILE_TYPE
from consumers.dispatch import dispatching
from consumers.outcomes import (
    Defer,
    InvalidMessage,
    Outcome,
    Reject,
    Result,
    describe_validation_error,
)
from consumers.pacing import (
    NoRoom,
    Pacing,
    background_options,
    batch_timeout_s,
    create_session,
)
from consumers.service import BackgroundLane, ConsumerPart, Lanes
from consumers.spec import Delivery
from consumers.sync import REFUSED, SENT, UNCERTAIN, UNSENT
from consumers.trace_form import trace_form
from consumers.trace_plan import Answer, Item, TraceCall, TracePlanner, reconcile_item
from schemas.fields import (
    DATE_FLOOR_CONTEXT,
    DEFAULT_DATE_FLOOR,
    DEFAULT_PHONE_REGION,
    PHONE_REGION_CONTEXT,
    ordered_at,
)
from schemas.platform_event import CustomerSubscriptionChanged
from schemas.shop_row import SHOP_ROW_TYPE, ShopRow

log = structlog.get_logger(__name__)

# Answers after which the same request may well succeed (docs/protocol.md §2: 429 and 5xx
# are undocumented but to be expected).
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_EXCERPT_CHARS = 300
_EDRONE_EVENT_ID = "x-edrone-event-id"
_FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def decode(
    body: bytes,
    apps: Mapping[str, AppConfig],
    date_floor: datetime = DEFAULT_DATE_FLOOR,
    phone_region: str = DEFAULT_PHONE_REGION,
) -> tuple[str, CustomerSubscriptionChanged]:
    """(app_id, event), its phone in E.164 (read in ``phone_region`` without a country code);
    :class:`InvalidMessage` when the message breaks the contract (a phone that is no valid
    number included), or holds what PostgreSQL cannot store: it would fail every batch it is
    in."""
    context = {DATE_FLOOR_CONTEXT: date_floor, PHONE_REGION_CONTEXT: phone_region}
    try:
        event = CustomerSubscriptionChanged.model_validate_json(body, context=context)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid platform event: {describe_validation_error(exc)}") from None
    app_id = event.app_id
    if app_id is None:
        if len(apps) != 1:
            raise InvalidMessage(
                "platform event without app_id, and not exactly one app is configured"
            )
        app_id = next(iter(apps))
    if app_id not in apps:
        raise InvalidMessage(f"unknown app_id {app_id!r}: not among the configured apps")
    return app_id, event


def decode_row(
    body: bytes, apps: Mapping[str, AppConfig], phone_region: str = DEFAULT_PHONE_REGION
) -> ShopRow:
    """A row of ``backfill`` or ``reconcile``; :class:`InvalidMessage` as :func:`decode`."""
    try:
        row = ShopRow.model_validate_json(body, context={PHONE_REGION_CONTEXT: phone_region})
    except ValidationError as exc:
        raise InvalidMessage(f"invalid shop row: {describe_validation_error(exc)}") from None
    if row.app_id not in apps:
        raise InvalidMessage(f"unknown app_id {row.app_id!r}: not among the configured apps")
    return row


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
    """The batch handler: decode, read the shop's changes into the sync state and tell edrone
    the winner of every address it is not known to hold (consumers/trace_plan.py), paced and
    within the concurrency bound; then record its answers.

    ``targets`` are the shops' own tables (a shop known to hold another status than the
    winner is corrected); ``nudge`` wakes the dispatcher after a commit that left messages.
    ``pacing`` (rate limits, breaker) is shared with the other lane's forwarder; a
    ``background`` one (the backfill lane) uses only what live traces leave of each limit,
    within its own concurrency bound, and defers, uncounted, the calls of a batch that found no
    room within ``background_max_wait_s``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: asyncpg.Pool,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        targets: Mapping[str, ShopTarget] | None = None,
        nudge: Callable[[], None] | None = None,
        pacing: Pacing | None = None,
        background: bool = False,
    ) -> None:
        options = settings.traces
        self._metrics = metrics if metrics is not None else Metrics()
        self._session = session
        self._pool = pool
        self._apps = settings.apps
        self._url = settings.trace_url
        self._options = options
        self._date_floor = settings.date_floor
        self._phone_region = settings.phone_region
        self._clock_skew = settings.clock_skew
        names = topology(settings)
        self._queue = names.backfill_queue if background else names.traces_queue
        self._planner = TracePlanner(pool, settings, targets or {}, nudge)
        self._version = bridge_version()
        self._background = background
        self._slots = asyncio.Semaphore(
            options.background_concurrency if background else options.concurrency
        )
        self._pacing = pacing if pacing is not None else Pacing(settings, pool)
        self.breaker = self._pacing.breaker
        self.rate_limit_waits = 0

    async def __call__(self, deliveries: Sequence[Delivery]) -> list[Result]:
        # Every message gets one: its Reject, the plan's label, or its call's outcome.
        outcomes: dict[int, Result] = {}
        items = []
        consumed_at = datetime.now(UTC)
        for index, delivery in enumerate(deliveries):
            try:
                items.append(self._item(index, delivery, consumed_at))
            except InvalidMessage as exc:
                outcomes[index] = Reject(exc.reason)
        if items:
            calls, labels = await self._planner.plan(items)
            for index, label in labels.items():
                outcomes[index] = label
            results = await self._send_all(calls, self._deadline())
            answers = []
            for call, (outcome, answer) in zip(calls, results, strict=True):
                outcomes[call.index] = outcome
                answers.append((call, answer))
            await self._record(answers)
        return [outcomes[index] for index in range(len(deliveries))]

    def _item(self, index: int, delivery: Delivery, consumed_at: datetime) -> Item:
        if delivery.type == RECONCILE_TYPE:
            try:
                item = reconcile_item(index, json.loads(delivery.body))
                return replace(item, redelivered=bool(delivery.redelivered))
            except (ValueError, TypeError, KeyError) as exc:
                raise InvalidMessage(f"invalid reconcile request: {exc!r}") from None
        if delivery.type == SHOP_ROW_TYPE:
            row = decode_row(delivery.body, self._apps, self._phone_region)
            return Item(index, row.app_id, row=row, redelivered=bool(delivery.redelivered))
        app_id, event = decode(delivery.body, self._apps, self._date_floor, self._phone_region)
        event = self._clamped(app_id, event, consumed_at)
        return Item(index, app_id, event, redelivered=bool(delivery.redelivered))

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

    async def _send_all(
        self, calls: list[TraceCall], deadline: float | None
    ) -> list[tuple[Result, Answer]]:
        if not calls:
            return []
        if self.breaker.probing:
            # edrone failed until a moment ago: one call tests the way before the others go,
            # and a failed test is not the message's fault.
            first = await self._send(calls[0], deadline)
            if isinstance(first[0], Defer):
                first = (_paused(self.breaker.paused_for_s), first[1])
            rest = await asyncio.gather(*(self._send(call, deadline) for call in calls[1:]))
            return [first, *rest]
        return list(await asyncio.gather(*(self._send(call, deadline) for call in calls)))

    async def _send(self, call: TraceCall, deadline: float | None) -> tuple[Result, Answer]:
        """One trace call and its outcome, with what it tells of edrone's state."""
        event_id = call.event.event_id if call.event is not None else None
        with structlog.contextvars.bound_contextvars(app_id=call.app_id, event_id=event_id):
            async with self._slots:
                paused_s = self.breaker.paused_for_s
                if paused_s > 0:
                    self._metrics.traces.labels("paused").inc()
                    return _paused(paused_s), Answer(UNSENT, "edrone is failing: sending paused")
                try:
                    encoded = self._encode(call)
                except Exception as exc:
                    # This message alone cannot be sent; failing the batch instead would call
                    # edrone again for every other message in it.
                    log.warning("trace_unencodable", error=repr(exc))
                    reason = f"cannot build the trace: {exc!r}"
                    return Reject(reason), Answer(UNSENT, reason)
                try:
                    async with self._paced(call.app_id, deadline):
                        return await self._post(encoded)
                except NoRoom as exc:
                    # Live traffic used the limit all along: not the message's fault.
                    self._metrics.traces.labels("no_room").inc()
                    return Defer(str(exc), counts=False), Answer(UNSENT, str(exc))

    def _encode(self, call: TraceCall) -> bytes:
        form = trace_form(
            call,
            self._apps[call.app_id],
            platform=self._options.platform,
            platform_version=self._options.platform_version or self._version,
            version=self._version,
        )
        # Encoded here, exactly as aiohttp's FormData would, without its per-call machinery
        # (a tenth of the forwarder's CPU per trace, benchmarks/).
        return urlencode(form, doseq=True, encoding="utf-8").encode()

    async def _post(self, encoded: bytes) -> tuple[Result, Answer]:
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
            reason = f"no answer from edrone: {exc!r}"
            # edrone may have applied it before the answer was lost.
            return Defer(reason), Answer(UNCERTAIN, reason)
        answer = f"edrone answered {status}: {body[:_EXCERPT_CHARS]}"
        if 200 <= status < 300:
            self.breaker.succeeded()
            self._metrics.traces.labels("sent").inc()
            log.debug("trace_sent", edrone_event_id=edrone_id)
            return Outcome.SENT, Answer(SENT, f"edrone answered {status}", edrone_id)
        if status in _RETRYABLE_STATUSES or status >= 500:
            self.breaker.failed()
            self._metrics.traces.labels("retryable_status").inc()
            log.warning("trace_retry", status=status)
            # A 5xx may come after edrone applied it; a 408, 425 or 429 did not apply.
            state = UNCERTAIN if status >= 500 else UNSENT
            return Defer(answer, after_s=after_s), Answer(state, answer)
        # edrone is up and refuses this request for good: retrying cannot help.
        self.breaker.succeeded()
        self._metrics.traces.labels("refused").inc()
        log.warning("trace_refused", status=status)
        return Reject(answer), Answer(REFUSED, answer)

    def _deadline(self) -> float | None:
        """When a background batch stops waiting for room (loop time); None for live ones."""
        if not self._background:
            return None
        return asyncio.get_running_loop().time() + self._options.background_max_wait_s

    @asynccontextmanager
    async def _paced(self, app_id: str, deadline: float | None) -> AsyncIterator[None]:
        """Within the app's rate limit, for the whole call (see SharedRateLimiter); by ``deadline``
        (loop time) or :class:`NoRoom`."""
        timeout_s = None
        if deadline is not None:
            timeout_s = max(0.0, deadline - asyncio.get_running_loop().time())
        async with self._pacing.slot(
            app_id, background=self._background, timeout_s=timeout_s
        ) as waited_s:
            if waited_s > 0:
                self.rate_limit_waits += 1
                # The metric tells of live traces held up; the background waits by design.
                if not self._background:
                    self._metrics.rate_limit_waits.labels(app_id).inc()
                    self._metrics.rate_limit_wait_seconds.labels(app_id).inc(waited_s)
            yield

    async def _record(self, answers: list[tuple[TraceCall, Answer]]) -> None:
        # The calls are made: a failure here, whatever it is, only costs a later check, so it
        # must not fail the batch (its retry, or its halves, would call edrone again).
        try:
            async with asyncio.timeout(self._options.db_timeout_s):
                await self._planner.record(answers)
        except Exception as exc:
            log.warning("trace_answers_not_recorded", count=len(answers), error=repr(exc))


def _paused(paused_s: float) -> Defer:
    # Not the message's fault: this retry does not use up a tier.
    return Defer("edrone is failing; sending paused", after_s=paused_s, counts=False)


@asynccontextmanager
async def _forwarder(
    connection: AbstractConnection,
    pool: asyncpg.Pool,
    settings: Settings,
    metrics: Metrics | None,
) -> AsyncIterator[Lanes]:
    """The forwarders of both lanes, with their HTTP session to edrone, the shops' tables they
    correct, the dispatcher they nudge and the pacing they share."""
    # Checked before consuming: a mapping that does not fit the table stops the start.
    targets = await resolve_targets(pool, settings.apps)
    async with (
        create_session(settings) as session,
        dispatching(connection, pool, settings) as dispatcher,
        # One pacing for both lanes: the rate limits serve live first, the breaker pauses both.
        Pacing(settings, pool) as pacing,
    ):
        forwarder = functools.partial(
            TraceForwarder,
            session,
            pool,
            settings,
            metrics,
            targets=targets,
            nudge=dispatcher.nudge,
            pacing=pacing,
        )
        yield Lanes(forwarder(), forwarder(background=True))


# `edrone-bridge consume traces` (served by consumers.service.serve).
PART = ConsumerPart(
    name="consume traces",
    queue=lambda settings: topology(settings).traces_queue,
    declare=declare_trace_topology,
    handler=_forwarder,
    options=lambda settings: settings.traces,
    timeout_s=lambda settings: batch_timeout_s(settings.traces),
    command_timeout_s=lambda settings: settings.traces.db_timeout_s,
    probe_timeout_s=lambda settings: min(settings.traces.db_timeout_s, 5.0),
    retry_tiers_s=lambda settings: settings.traces.retry_tiers_s,
    background=BackgroundLane(
        queue=lambda settings: topology(settings).backfill_queue,
        timeout_s=lambda settings: batch_timeout_s(settings.traces, background=True),
        options=lambda settings: background_options(settings.traces),
    ),
    lanes=lambda settings: (settings.traces.lane != "background", settings.traces.lane != "live"),
)
