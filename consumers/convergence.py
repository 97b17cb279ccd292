"""What both consumers do with the sync state inside their transactions: read a change into it
(``consumers/sync.py``'s rule) with a line of history, and bring the shop to the winner where it
is not known to hold it: its mapped table, and its bus for apps that ``publish_changes``."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bridge.config import Settings
from bridge.shop_table import ShopTarget
from consumers.outcomes import Outcome
from consumers.shop_rows import RowReading, on_shop_row
from consumers.shop_target import Applied, Change, apply_changes, writable
from consumers.sync import (
    EDRONE,
    Decision,
    EdroneChange,
    ShopChange,
    edrone_certain,
    edrone_needs_trace,
    lapse,
    on_shop_change,
    on_webhook,
    shop_needs_write,
    trace_in_flight,
    wrote,
)
from consumers.sync_store import DispatchRow, Key, SyncBatch, WriteRow
from schemas.edrone_change import EVENT_TYPE, EdroneSubscriptionChanged
from schemas.fields import ordered_at
from schemas.platform_event import CustomerSubscriptionChanged
from schemas.shop_row import ShopRow
from schemas.subscription import SubscriptionStatusChanged, status_name

# The type of a request, on the trace queue, to bring edrone to an address's winner.
RECONCILE_TYPE = "bridge.reconcile"


def webhook_key(event: SubscriptionStatusChanged) -> Key:
    return (event.app_id, event.channel, event.address)


def shop_keys(app_id: str, event: CustomerSubscriptionChanged | ShopRow) -> list[Key]:
    """The addresses a shop change speaks of: its e-mail, and its phone when it gives an SMS
    status (a null one says nothing of SMS, as the trace sent it before)."""
    keys: list[Key] = [(app_id, "email", event.email)]
    if event.phone and event.sms_subscriber_status is not None:
        keys.append((app_id, "sms", event.phone))
    return keys


@dataclass
class Converger:
    """The rule applied with its settings, and the ways to reach each app's shop."""

    settings: Settings
    targets: Mapping[str, ShopTarget]

    @property
    def skew(self) -> timedelta:
        return self.settings.clock_skew

    def read_webhook(
        self, batch: SyncBatch, event: SubscriptionStatusChanged, ordered_at: datetime
    ) -> tuple[Decision, int]:
        """The decision on a webhook and its place in the address's learning order; its line
        of history is kept with it in the inbox (the caller's)."""
        key = webhook_key(event)
        change = EdroneChange(
            event.status,
            ordered_at,
            event.event_id,
            event.reason,
            event.channel,
            whole_seconds=_whole_seconds(event.event_date_raw),
        )
        decision = on_webhook(batch.states[key], change, self.skew)
        if event.channel == "sms" and event.email:
            batch.emails[key] = event.email
        return decision, batch.states[key].seq

    def read_shop_change(
        self, batch: SyncBatch, app_id: str, event: CustomerSubscriptionChanged
    ) -> dict[Key, Decision]:
        decisions = {}
        for key in shop_keys(app_id, event):
            status = event.subscriber_status if key[1] == "email" else event.sms_subscriber_status
            change = ShopChange(
                status,
                event.occurred_at,
                event.event_id,
                event.caused_by,
                names_causes=self.settings.apps[app_id].shop_names_causes,
            )
            decision = on_shop_change(
                batch.states[key],
                change,
                timedelta(seconds=self.settings.sync.echo_clock_tolerance_s),
                timedelta(seconds=self.settings.sync.echo_latency_s),
            )
            if key[1] == "sms":
                batch.emails[key] = event.email
            batch.note(
                key, "shop", "shop_change", event.event_id, status, None, event.occurred_at,
                decision.decision, decision.why,
            )  # fmt: skip
            decisions[key] = decision
        return decisions

    def read_shop_row(self, batch: SyncBatch, row: ShopRow, now: datetime) -> dict[Key, Decision]:
        """A row of the shop's table or file (backfill, reconcile), per address it names."""
        settings = self.settings
        # The bridge's own writes are stamped before they commit, by its clock, as reads are.
        margin = timedelta(seconds=settings.sync.echo_latency_s)
        # A date in the future holds the address no longer than a shop change's would.
        changed_at = row.changed_at and ordered_at(row.changed_at, now, settings.clock_skew)
        decisions = {}
        for key in shop_keys(row.app_id, row):
            status = row.subscriber_status if key[1] == "email" else row.sms_subscriber_status
            reading = RowReading(status, row.observed_at, row.event_id, changed_at)
            decision = on_shop_row(
                batch.states[key], reading, floor=settings.date_floor, margin=margin
            )
            if key[1] == "sms":
                batch.emails[key] = row.email
            batch.note(
                key, "shop", row.source, row.event_id, status, None, changed_at,
                decision.decision, decision.why,
            )  # fmt: skip
            decisions[key] = decision
        return decisions

    def lapse(self, batch: SyncBatch, now: datetime) -> None:
        window = timedelta(seconds=self.settings.sync.ack_window_s)
        for state in batch.states.values():
            lapse(state, now, window)

    def edrone_needs_trace(self, batch: SyncBatch, key: Key) -> bool:
        return edrone_needs_trace(batch.states[key])

    def trace_in_flight(self, batch: SyncBatch, key: Key, now: datetime) -> bool:
        # A trace's whole call is bounded by the trace timeout; a little more, and it is lost.
        grace = timedelta(seconds=self.settings.traces.timeout_s + 5)
        return trace_in_flight(batch.states[key], now, grace)

    async def bring_shop(
        self, batch: SyncBatch, keys: Iterable[Key], won: set[Key], now: datetime
    ) -> set[Key]:
        """Write the winner to the shop where it is not known to hold it: to its table (also
        where edrone's change just won, ``won``: a table kept by the shop's own code may have
        changed unseen), and on its bus for apps that publish changes (only where needed: a
        shop on the bus reports its every change, and a write that changes nothing there has
        no echo to match); the keys whose address has no row in the shop's table."""
        needed = {key for key in keys if shop_needs_write(batch.states[key])}
        wanted = [
            key
            for key in sorted(set(keys))
            if batch.states[key].winner is not None and (key in won or key in needed)
        ]
        changes = [
            Change(key, key[1], key[2], batch.states[key].winner.status)  # type: ignore[union-attr]
            for key in wanted
            if writable(self.targets, key[0], key[1], batch.states[key].winner.status)  # type: ignore[union-attr]
        ]
        applied = (
            await apply_changes(batch.conn, self.targets, changes, self.settings.phone_region)
            if changes
            else Applied()
        )
        for key in wanted:
            self._wrote(batch, key, applied, now, publish=key in needed)
        return {(key[0], key[1], key[2]) for key in applied.unknown}

    def _wrote(
        self, batch: SyncBatch, key: Key, applied: Applied, now: datetime, *, publish: bool
    ) -> None:
        state = batch.states[key]
        winner = state.winner
        assert winner is not None
        if key in applied.written:
            write_id = str(uuid.uuid4())
            wrote(state, winner.status, applied.written[key], write_id, echoes=False)
            batch.writes.append(
                WriteRow(
                    write_id, key, winner.status, winner.event_id, "table",
                    applied.written[key], echoes=False,
                )
            )  # fmt: skip
            batch.note_bridge(key, "write", "written", "to the shop's table", write_id)
        elif key in applied.unknown:
            batch.note_bridge(key, "write", Outcome.UNKNOWN_CUSTOMER, "no row in the shop's table")
        if publish and self.settings.apps[key[0]].publish_changes:
            # Its echo is awaited: it changes what the shop holds. One that never comes (a
            # person set that status meanwhile) ends with a person's later change, or lapses.
            write_id = str(uuid.uuid4())
            wrote(state, winner.status, now, write_id, echoes=True)
            batch.writes.append(
                WriteRow(write_id, key, winner.status, winner.event_id, "bus", now, True)
            )
            batch.dispatch.append(self._change_event(batch, key, write_id, now))
            batch.note_bridge(key, "write", "published", f"as {EVENT_TYPE} {write_id}", write_id)

    def _change_event(
        self, batch: SyncBatch, key: Key, write_id: str, now: datetime
    ) -> DispatchRow:
        app_id, channel, address = key
        winner = batch.states[key].winner
        assert winner is not None
        event = EdroneSubscriptionChanged(
            event_id=write_id,
            app_id=app_id,
            channel=channel,  # type: ignore[arg-type]
            address=address,
            email=address if channel == "email" else batch.emails.get(key),
            subscriber_status=winner.status,  # type: ignore[arg-type]
            occurred_at=winner.stamp.at,
            origin=winner.side,
            edrone_event_id=winner.event_id if winner.side == EDRONE else None,
            published_at=now,
        )
        exchange = self.settings.changes_exchange or self.settings.platform_exchange
        return DispatchRow(
            exchange,
            self.settings.changes_routing_key,
            write_id,
            EVENT_TYPE,
            event.model_dump(mode="json"),
        )

    def request_trace(self, batch: SyncBatch, key: Key, queue: str, now: datetime) -> None:
        """Ask the trace forwarder (through ``dispatch``) to bring edrone to the winner."""
        state = batch.states[key]
        assert state.winner is not None
        if state.edrone is None:
            held = "nothing known"
        elif not edrone_certain(state):
            held = "an unsure status (several seen in one second)"
        else:
            held = status_name(state.edrone.status)
        batch.dispatch.append(
            DispatchRow(
                "",
                queue,
                f"reconcile-{uuid.uuid4()}",
                RECONCILE_TYPE,
                {"app_id": key[0], "channel": key[1], "address": key[2]},
            )
        )
        batch.note_bridge(
            key,
            "reconcile",
            "correction_requested",
            f"edrone holds {held}, the winner is {status_name(state.winner.status)}",
        )


def utcnow() -> datetime:
    return datetime.now(UTC)


def _whole_seconds(raw: str) -> bool:
    """edrone's date was written to the second (``2024-01-15 10:30:00``), not finer; an
    empty one (the legacy unsubscribe callback's) is its precise receipt time."""
    time_part = raw.replace("T", " ").partition(" ")[2]
    return bool(raw) and "." not in time_part and "," not in time_part
