"""What the trace forwarder tells edrone, decided from the sync state (docs/design.md promise 6):
one transaction reads the shop's changes into it, brings the shop to the winner where needed
and records the traces about to be sent; a second records edrone's answers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from bridge.config import Settings
from bridge.shop_table import ShopTarget
from consumers import sync_store
from consumers.convergence import Converger, shop_keys, utcnow
from consumers.outcomes import Defer, Outcome, Result, database_retry
from consumers.sync import Decision, OpenTrace, Verdict, trace_answered
from consumers.sync_store import Key, SyncBatch
from schemas.platform_event import CustomerSubscriptionChanged
from schemas.shop_row import ShopRow


@dataclass(frozen=True)
class Item:
    """One message of a batch: a shop change, a row of the shop's (backfill, reconcile), or a
    request to bring edrone to one address's winner."""

    index: int
    app_id: str
    event: CustomerSubscriptionChanged | None = None
    key: Key | None = None
    row: ShopRow | None = None
    # Delivered before and not acked: a trace it was sending died with its consumer.
    redelivered: bool = False


@dataclass
class TraceCall:
    """One request to edrone about one customer, and the open traces (one per address) it
    delivers. ``email_status`` is None with ``email_known`` False when edrone is not to be told
    the e-mail status at all (an SMS reconciliation)."""

    index: int
    app_id: str
    email: str
    occurred_at: datetime
    email_known: bool = False
    email_status: int | None = None
    phone: str | None = None
    sms_known: bool = False
    sms_status: int | None = None
    event: CustomerSubscriptionChanged | None = None  # names and tags, when a change brought them
    # The addresses edrone is not known to hold the winner of: a trace is opened for each.
    needed: list[Key] = field(default_factory=list)
    traces: list[tuple[Key, OpenTrace]] = field(default_factory=list)


@dataclass(frozen=True)
class Answer:
    """What came of a call: the trace state it leaves, and a line for the history."""

    state: str  # sent | uncertain | refused | unsent
    why: str
    edrone_event_id: str | None = None


class TracePlanner:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        targets: Mapping[str, ShopTarget],
        nudge: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._converger = Converger(settings, targets)
        self._nudge = nudge
        # The messages of the batch being planned that wait for another forwarder's trace.
        self.waiting: set[int] = set()

    async def plan(self, items: Sequence[Item]) -> tuple[list[TraceCall], dict[int, Result]]:
        """The calls to make, and the outcome of every message that gets none."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                calls, outcomes, dispatched = await self._plan(conn, items)
        except Exception as exc:
            # Nothing was sent yet, so the runtime may narrow a content error down to its
            # message by halves without calling edrone twice (promise 7).
            retry = database_retry(exc)
            if retry is None:
                raise
            raise retry from exc
        if dispatched and self._nudge is not None:
            self._nudge()
        return calls, outcomes

    async def _plan(
        self, conn: asyncpg.Connection, items: Sequence[Item]
    ) -> tuple[list[TraceCall], dict[int, Result], bool]:
        converger = self._converger
        self.waiting = set()
        keys_of = {item.index: _keys(item) for item in items}
        batch = await sync_store.lock(conn, (k for keys in keys_of.values() for k in keys))
        fresh = await sync_store.unseen(
            conn, [(item.app_id, _event_id(item)) for item in items if item.key is None]
        )
        labels: dict[int, Outcome] = {}
        # The messages whose change wins: a call carries each, its own or a later message's.
        winning: set[int] = set()
        won: set[Key] = set()
        for item in items:
            if item.key is not None:
                continue
            if (item.app_id, _event_id(item)) not in fresh:
                labels[item.index] = Outcome.DUPLICATE
                continue
            if item.row is not None:
                decisions = converger.read_shop_row(batch, item.row, utcnow())
            else:
                assert item.event is not None
                decisions = converger.read_shop_change(batch, item.app_id, item.event)
            wins = {key for key, d in decisions.items() if d.decision == Verdict.WINS}
            if wins:
                winning.add(item.index)
            else:
                labels[item.index] = _label(decisions)
            won.update(wins)
        # After the changes are read: the writes it stamps come after them.
        now = utcnow()
        converger.lapse(batch, now)
        await converger.bring_shop(batch, batch.states, set(), now)
        calls = await self._calls(batch, items, keys_of, won, now)
        outcomes: dict[int, Result] = {}
        called = {call.index for call in calls}
        last = _last_item_per_customer(items, keys_of, batch)
        for item in items:
            if item.index in called:
                continue
            label = labels.get(item.index, Outcome.NOOP)
            if item.index in winning:
                label = Outcome.COALESCED if last.get(item.index) in called else Outcome.NOOP
            outcomes[item.index] = label
            if item.index in self.waiting and label != Outcome.COALESCED:
                # Not the message's fault: this retry does not use up a tier.
                outcomes[item.index] = Defer("a trace of this address is being sent", counts=False)
        await batch.save()
        return calls, outcomes, bool(batch.dispatch)

    async def _calls(
        self,
        batch: SyncBatch,
        items: Sequence[Item],
        keys_of: Mapping[int, list[Key]],
        won: set[Key],
        now: datetime,
    ) -> list[TraceCall]:
        """One call per customer whose addresses edrone is not known to hold the winner of,
        attached to the customer's last message in the batch."""
        converger = self._converger
        by_customer: dict[tuple[str, str], TraceCall] = {}
        for item in items:
            for key in keys_of[item.index]:
                if not converger.edrone_needs_trace(batch, key):
                    continue
                if not item.redelivered and converger.trace_in_flight(batch, key, now):
                    # Another forwarder is sending it: its answer tells; this one checks again.
                    self.waiting.add(item.index)
                    continue
                email = key[2] if key[1] == "email" else batch.emails.get(key)
                if email is None:
                    why = "no e-mail known for this phone: no trace"
                    batch.note_bridge(key, "trace", Outcome.UNREACHABLE, why)
                    continue
                call = by_customer.setdefault(
                    (key[0], email),
                    TraceCall(item.index, key[0], email, batch.states[key].winner.stamp.at),  # type: ignore[union-attr]
                )
                call.index = max(call.index, item.index)
                if item.event is not None:
                    call.event = item.event
                elif item.row is not None and call.phone is None:
                    call.phone = item.row.phone
                _include(call, key, batch)
        for call in by_customer.values():
            _fill_in(call, batch)
        wanted = [
            (key, batch.states[key].winner, call)
            for call in by_customer.values()
            for key in call.needed
        ]
        traces = await batch.open_traces(
            [
                (key, w.status, w.stamp.at, w.event_id, key not in won)  # type: ignore[union-attr]
                for key, w, _ in wanted
            ]
        )
        for (key, _, call), trace in zip(wanted, traces, strict=True):
            call.traces.append((key, trace))
            kind = "corrective trace" if trace.corrective else "trace"
            batch.note_bridge(
                key, "trace", "sending", f"{kind} #{trace.id}: edrone is not known to hold it"
            )
        return list(by_customer.values())

    async def record(self, answers: Sequence[tuple[TraceCall, Answer]]) -> None:
        """Read edrone's answers into the state. The calls are made: a failure here only costs
        a later check, so it must not fail the batch (its retry would call edrone again)."""
        keys = [key for call, _ in answers for key, _ in call.traces]
        if not keys:
            return
        async with self._pool.acquire() as conn, conn.transaction():
            batch = await sync_store.lock(conn, keys)
            now = utcnow()
            for call, answer in answers:
                for key, trace in call.traces:
                    trace_answered(batch.states[key], trace.id, answer.state, now)
                    batch.note_bridge(
                        key, "trace", answer.state, answer.why, answer.edrone_event_id
                    )
            await batch.save()


def _keys(item: Item) -> list[Key]:
    if item.event is not None:
        return shop_keys(item.app_id, item.event)
    if item.row is not None:
        return shop_keys(item.app_id, item.row)
    assert item.key is not None
    return [item.key]


def _event_id(item: Item) -> str:
    message = item.row if item.row is not None else item.event
    assert message is not None
    return message.event_id


def _label(decisions: Mapping[Key, Decision]) -> Outcome:
    """The outcome of a shop change or row that wins nowhere: kept for a person, older than a
    winner, an echo, or nothing new."""
    names = {d.decision for d in decisions.values()}
    if Verdict.KEPT in names:
        return Outcome.KEPT
    if Verdict.OLDER in names:
        return Outcome.OLDER
    if Verdict.ECHO in names:
        return Outcome.ECHO
    if names == {Verdict.DUPLICATE}:
        return Outcome.DUPLICATE
    return Outcome.NOOP


def _fill_in(call: TraceCall, batch: SyncBatch) -> None:
    """What goes along unasked: the e-mail's winner when known (it is what edrone holds or is
    told anyway, and safer than leaving it empty), the phone the shop gave."""
    if call.phone is None and call.event is not None:
        call.phone = call.event.phone
    email_key = (call.app_id, "email", call.email)
    if not call.email_known and email_key in batch.states:
        winner = batch.states[email_key].winner
        if winner is not None:
            call.email_known, call.email_status = True, winner.status


def _include(call: TraceCall, key: Key, batch: SyncBatch) -> None:
    winner = batch.states[key].winner
    assert winner is not None
    if key in call.needed:
        return
    call.needed.append(key)
    if key[1] == "email":
        call.email_known, call.email_status = True, winner.status
    else:
        call.sms_known, call.sms_status, call.phone = True, winner.status, key[2]
    call.occurred_at = max(call.occurred_at, winner.stamp.at)


def _last_item_per_customer(
    items: Sequence[Item], keys_of: Mapping[int, list[Key]], batch: SyncBatch
) -> dict[int, int]:
    """For each message, the last message in the batch about the same customer."""
    last: dict[tuple[str, str], int] = {}
    customer_of: dict[int, tuple[str, str]] = {}
    for item in items:
        key = keys_of[item.index][0]
        email = key[2] if key[1] == "email" else batch.emails.get(key, key[2])
        customer_of[item.index] = (key[0], email)
        last[(key[0], email)] = item.index
    return {index: last[customer] for index, customer in customer_of.items()}


def reconcile_item(index: int, body: dict[str, object]) -> Item:
    """A request (from ``dispatch``) to bring edrone to one address's winner."""
    app_id, channel, address = (str(body[name]) for name in ("app_id", "channel", "address"))
    return Item(index, app_id, key=(app_id, channel, address))
