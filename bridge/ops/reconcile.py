"""``edrone-bridge reconcile``: the differences between the shop's mapped table, the sync state
and (given an export file) edrone, listed as ``bridge.ops.drift`` finds them, and with
``--repair`` handed to the consumers, which decide with the rule as for any change:

- a shop row that differs goes as a :class:`ShopRow` (``source="reconcile"``) to the trace
  forwarder's background lane: a row newer than the winner is traced to edrone, an older one
  has the winner written back to the shop's table;
- an export line that differs goes as edrone's change (:class:`SubscriptionStatusChanged`, as
  the ingress would publish it) to the subscription consumer, newest-wins.

Nothing is written here: the read is one read-only snapshot, and the consumers do the rest.
``needs_review`` (a row that would resubscribe a known unsubscribe) and ``missing_in_shop``
are only reported."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from pydantic import ValidationError

from bridge.amqp import ROUTING_KEY_BY_CHANNEL, declare_topology
from bridge.broker import connect
from bridge.config import Settings
from bridge.ops.drift import UNREPAIRABLE, Comparison, Difference, differences
from bridge.ops.edrone_export import TABLE, load_export
from bridge.ops.row_lane import RowLane, open_lane
from bridge.publishing import ConfirmedPublisher
from bridge.shop_table import ShopTarget
from schemas.fields import DATE_FLOOR_CONTEXT, PHONE_REGION_CONTEXT
from schemas.shop_row import ShopRow, row_event_id
from schemas.subscription import SubscriptionStatusChanged

log = structlog.get_logger(__name__)

# uuid5 names of the edrone changes read from an export: the same line is the same event.
_EXPORT_NAMESPACE = uuid.UUID("0b6f2f7e-3c2a-4a53-9d0e-6f1c8f4b2a17")
# Rows (and edrone changes) handed over per group, and how many may wait in the lane.
GROUP = 500
MAX_LANE_DEPTH = 10_000


@dataclass
class Report:
    """What one run found (every difference counted, ``listed`` of them shown) and did."""

    app_id: str
    observed_at: datetime | None = None
    export_rows: int | None = None  # None: no export, edrone's side not compared
    counts: Counter[str] = field(default_factory=Counter)
    listed: int = 0
    repaired: Counter[str] = field(default_factory=Counter)  # shop_rows, edrone_changes, ...

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "observed_at": self.observed_at.isoformat() if self.observed_at else None,
            "edrone_compared": self.export_rows is not None,
            "export_rows": self.export_rows,
            "differences": self.total,
            "by_kind": dict(sorted(self.counts.items())),
            "listed": self.listed,
            "repaired": dict(sorted(self.repaired.items())) if self.repaired else None,
        }


class Repairer:
    """Turns differences into messages for the consumers, sent in confirmed groups."""

    def __init__(
        self,
        lane: RowLane,
        webhooks: ConfirmedPublisher,
        settings: Settings,
        app_id: str,
        run_id: str,
    ) -> None:
        self._lane = lane
        self._webhooks = webhooks
        self._settings = settings
        self._app_id = app_id
        self._run_id = run_id
        self._rows: list[ShopRow] = []
        self._changes: dict[str, SubscriptionStatusChanged] = {}
        self.done: Counter[str] = Counter()

    async def add(self, d: Difference, observed_at: datetime) -> None:
        if d.kind in UNREPAIRABLE:
            self.done["left_for_review" if d.kind == "needs_review" else "not_repairable"] += 1
            return
        acted = False
        if d.export_differs:
            acted |= self._add_change(d)
        if d.has_row and d.kind != "edrone_changed_unseen":
            acted |= self._add_row(d, observed_at)
        if not acted:
            self.done["not_repairable"] += 1
        if len(self._rows) + len(self._changes) >= GROUP:
            await self.flush()

    async def flush(self) -> None:
        rows, changes = self._rows, list(self._changes.values())
        self._rows, self._changes = [], {}
        await self._lane.send(rows)
        await asyncio.gather(
            *(
                self._webhooks.publish(
                    change.model_dump_json().encode(),
                    routing_key=ROUTING_KEY_BY_CHANNEL[change.channel],
                    message_id=change.event_id,
                )
                for change in changes
            )
        )
        self.done["shop_rows"] += len(rows)
        self.done["edrone_changes"] += len(changes)

    def _add_row(self, d: Difference, observed_at: datetime) -> bool:
        sms = d.channel == "sms"
        email = d.row_email if sms else d.address
        status = d.row_email_status if sms else d.row_status
        phone, sms_status = (d.address, d.row_status) if sms else (None, None)
        fields = {
            "event_id": row_event_id(
                self._run_id, self._app_id, str(email), status, phone, sms_status,
                d.row_changed_at,
            ),
            "app_id": self._app_id, "email": email, "subscriber_status": status, "phone": phone,
            "sms_subscriber_status": sms_status, "changed_at": d.row_changed_at,
            "observed_at": observed_at, "source": "reconcile", "run_id": self._run_id,
        }  # fmt: skip
        try:
            row = ShopRow.model_validate(
                fields, context={PHONE_REGION_CONTEXT: self._settings.phone_region}
            )
        except ValidationError as exc:
            log.warning("reconcile_row_invalid", channel=d.channel, errors=exc.error_count())
            self.done["invalid"] += 1
            return False
        self._rows.append(row)
        return True

    def _add_change(self, d: Difference) -> bool:
        assert d.export_at is not None
        at = d.export_at.astimezone(UTC)
        name = "|".join((self._app_id, d.channel, d.address, str(d.export_status), at.isoformat()))
        event_id = f"reconcile-{uuid.uuid5(_EXPORT_NAMESPACE, name)}"
        fields = {
            "app_id": self._app_id, "channel": d.channel, "address": d.address,
            "email": d.row_email if d.channel == "sms" else None,
            "status": d.export_status, "reason": None, "event_id": event_id,
            "event_date": at, "event_date_raw": at.isoformat(),
            "received_at": datetime.now(UTC), "protocol": "NATIVE_5",
        }  # fmt: skip
        try:
            change = SubscriptionStatusChanged.model_validate(
                fields, context={DATE_FLOOR_CONTEXT: self._settings.date_floor}
            )
        except ValidationError as exc:
            log.warning("reconcile_change_invalid", channel=d.channel, errors=exc.error_count())
            self.done["invalid"] += 1
            return False
        self._changes[event_id] = change
        return True


@asynccontextmanager
async def repairing(settings: Settings, app_id: str) -> AsyncIterator[Repairer]:
    """A :class:`Repairer` on its own connections (the lane's, and one for edrone's changes,
    on the declared webhook exchange)."""
    run_id = f"reconcile-{uuid.uuid4()}"
    async with open_lane(settings, "edrone-bridge reconcile", max_depth=MAX_LANE_DEPTH) as lane:
        robust = await connect(settings, "edrone-bridge reconcile webhooks")
        async with robust as connection:
            channel = await connection.channel(publisher_confirms=True)
            async with channel:
                exchange = await declare_topology(channel, settings)
                publisher = ConfirmedPublisher(channel, exchange, settings.publish_timeout_s)
                yield Repairer(lane, publisher, settings, app_id, run_id)


async def reconcile(
    pool: asyncpg.Pool,
    settings: Settings,
    target: ShopTarget,
    *,
    export: Path | None = None,
    limit: int | None = None,
    show: Callable[[Difference], None] = lambda d: None,
    repair: Callable[[], AbstractAsyncContextManager[Repairer]] | None = None,
) -> Report:
    """Compare, calling ``show`` for the first ``limit`` differences (all when None) and, with
    ``repair`` (say ``lambda: repairing(settings, app_id)``), handing every one to the
    repairer it opens. The export is loaded first: a bad file raises
    :class:`bridge.ops.edrone_export.ExportError` before anything is read, declared or sent."""
    report = Report(target.app_id)
    comparison = Comparison(target, settings.phone_region, export=export is not None)
    async with pool.acquire() as conn, AsyncExitStack() as stack:
        try:
            if export is not None:
                sms = "sms" in comparison.channels()
                report.export_rows = await load_export(
                    conn, export, phone_region=settings.phone_region, sms=sms
                )
            repairer = await stack.enter_async_context(repair()) if repair else None
            # One snapshot for every channel; a cursor, so memory stays bounded.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                report.observed_at = await conn.fetchval("SELECT now()")
                async for d in differences(conn, comparison):
                    report.counts[d.kind] += 1
                    if limit is None or report.listed < limit:
                        show(d)
                        report.listed += 1
                    if repairer is not None:
                        await repairer.add(d, report.observed_at)
            if repairer is not None:
                await repairer.flush()
                report.repaired = repairer.done
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{TABLE}")
    return report
