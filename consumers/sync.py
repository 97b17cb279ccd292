"""Two-way convergence (docs/design.md promise 6), as a pure rule: per (app, channel, address) the
newest change a person made, on either side, wins on both sides.

Each change is read for what it is: a person's change; edrone acknowledging one of the bridge's
own traces (a TRACE reason, the status of a trace the bridge sent and edrone has not
acknowledged yet); or the shop echoing one of the bridge's own writes (its ``caused_by``, or the
write it follows with the same status). Only a person's change can win. Then each side that is
not known to hold the winner is told: edrone by a trace, the shop by a write. The state and its
store live in ``consumers/sync_store.py``; nothing here does I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from schemas.subscription import status_name

Side = Literal["edrone", "shop"]
EDRONE: Side = "edrone"
SHOP: Side = "shop"


class Verdict(StrEnum):
    """What the bridge made of a change (the history's decision column, so the values are
    stored: never rename one)."""

    WINS = "wins"  # a person's change, the newest so far: both sides are brought to it
    OLDER = "older"  # a person's change older than the winner: recorded, never applied
    ACKNOWLEDGED = "acknowledged"  # edrone confirming a trace of the bridge's: no new change
    ECHO = "echo"  # the shop mirroring a write of the bridge's: no new change
    DUPLICATE = "duplicate"  # seen before (a redelivery): nothing new
    KEPT = "kept"  # a shop row that would resubscribe a known unsubscribe: left for a person


# Trace states: "sending" is recorded before the call (an acknowledgement may overtake its
# answer), "sent" after a 2xx, "uncertain" after no answer or a 5xx (edrone may have applied
# it). Closed: acknowledged, superseded, lapsed; refused (a 4xx) and unsent (never called).
SENDING, SENT, UNCERTAIN = "sending", "sent", "uncertain"
REFUSED, UNSENT = "refused", "unsent"
OPEN_TRACE_STATES = frozenset({SENDING, SENT, UNCERTAIN})

# edrone's reason codes for a status a trace set (docs/protocol.md §3 and §5); the same
# codes come from edrone's storefront script, so a code alone proves nothing.
TRACE_REASONS = {"email": frozenset({6, 10, 13}), "sms": frozenset({10})}


@dataclass(frozen=True)
class Stamp:
    """When a change counts as made, and in which order the bridge learned it (the tie-break).

    ``whole_seconds``: the source's clock had second resolution (edrone's dates may), so times
    are compared at that resolution; ``seq`` counts per address in learning order."""

    at: datetime
    seq: int
    whole_seconds: bool = False


def newer(a: Stamp, b: Stamp) -> bool:
    """``a`` is newer than ``b``: by time at the coarser resolution of the two; a tie at that
    resolution falls to the one the bridge learned later."""
    if a.whole_seconds or b.whole_seconds:
        return (a.at.replace(microsecond=0), a.seq) > (b.at.replace(microsecond=0), b.seq)
    return (a.at, a.seq) > (b.at, b.seq)


@dataclass(frozen=True)
class Held:
    """A status one side holds, as of when it came to hold it (by that side's clock)."""

    status: int | None
    stamp: Stamp


@dataclass(frozen=True)
class Winner:
    status: int | None
    stamp: Stamp
    side: Side
    event_id: str
    # The earliest the winning change can have been made: its own time, or, when it won by a
    # tie at the second over a change known to the millisecond, that change's time. A change
    # known to the millisecond must be later than this to win: ties do not chain.
    floor: datetime | None = None

    @property
    def earliest(self) -> datetime:
        return self.floor if self.floor is not None else self.stamp.at


@dataclass
class OpenTrace:
    """A trace the bridge sent (or is sending) that edrone has not acknowledged yet."""

    id: int
    status: int | None
    made_at: datetime  # the time of the change it delivers
    sent_at: datetime
    state: str
    corrective: bool = False


@dataclass
class PendingWrite:
    """A write of the bridge's to the shop whose echo has not come back yet."""

    write_id: str
    status: int | None
    written_at: datetime


@dataclass
class SyncState:
    """Everything the rule knows of one address."""

    winner: Winner | None = None
    edrone: Held | None = None
    shop: Held | None = None
    traces: list[OpenTrace] = field(default_factory=list)
    writes: list[PendingWrite] = field(default_factory=list)
    seq: int = 0  # the last learning order handed out
    # The latest whole second edrone was seen in (by its webhooks' dates and its answers to
    # traces), and which statuses it was seen holding then (bits: 1 unsubscribed, 2
    # subscribed, 4 unknown). Two statuses in one second, with dates that may be written to
    # the second and webhooks that come in any order: what edrone holds is not known.
    edrone_second: datetime | None = None
    edrone_seen: int = 0
    # Changed since loading: traces' new states (answered, acknowledged, superseded, lapsed);
    # writes closed (echoed, lapsed).
    trace_updates: dict[int, str] = field(default_factory=dict)
    closed_writes: dict[str, str] = field(default_factory=dict)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@dataclass(frozen=True)
class EdroneChange:
    """One of edrone's webhooks: its status, its event_date (clamped), its reason."""

    status: int | None
    at: datetime
    event_id: str
    reason: int | None
    channel: str
    whole_seconds: bool = False

    @property
    def trace_reason(self) -> bool:
        return self.reason is not None and self.reason in TRACE_REASONS[self.channel]


@dataclass(frozen=True)
class ShopChange:
    """One of the shop's changes: its status, its occurred_at (clamped), what caused it.
    ``names_causes``: the shop sets caused_by on every echo, so a change without it is a
    person's; else an echo is found among the bridge's writes."""

    status: int | None
    at: datetime
    event_id: str
    caused_by: str | None = None
    names_causes: bool = False


@dataclass(frozen=True)
class Decision:
    """What the bridge made of a change, and why: a line of ``edrone-bridge history``."""

    decision: Verdict
    why: str


def on_webhook(state: SyncState, change: EdroneChange, skew: timedelta) -> Decision:
    """Read an edrone webhook into ``state``."""
    stamp = Stamp(change.at, state.next_seq(), change.whole_seconds)
    trace = _acknowledged_trace(state, change, skew) if change.trace_reason else None
    learn_held(state, EDRONE, change.status, stamp)
    if trace is not None:
        _close_acknowledged(state, trace)
        return Decision(
            Verdict.ACKNOWLEDGED,
            f"confirms the bridge's trace #{trace.id} of {_fmt(trace.made_at)}: no new change",
        )
    return contend(state, Winner(change.status, stamp, EDRONE, change.event_id))


def on_shop_change(
    state: SyncState,
    change: ShopChange,
    tolerance: timedelta = timedelta(0),
    echo_latency: timedelta = timedelta(seconds=5),
) -> Decision:
    """Read a shop change into ``state``. An echo follows its write: by the clocks, less
    ``tolerance`` (the shop's clock may lag the bridge's that much); ``echo_latency`` bounds how
    long after a write the shop applies it (and echoes it, if it changes the shop's value)."""
    stamp = Stamp(change.at, state.next_seq())
    write = _echoed_write(state, change, tolerance, echo_latency)
    learn_held(state, SHOP, change.status, stamp)
    if write is not None:
        # The shop applies the bridge's writes in turn: the ones before this one have been
        # applied, echoed or not (a write of the status the shop held already has no echo).
        for earlier in [w for w in state.writes if w.written_at <= write.written_at]:
            state.writes.remove(earlier)
            state.closed_writes[earlier.write_id] = "echoed" if earlier is write else "lapsed"
        if state.writes and state.shop is not None:
            # Later writes are on their way and the shop applies them in turn: it will hold
            # the last one's status, so that one needs no writing again.
            state.shop = Held(state.writes[-1].status, state.shop.stamp)
        return Decision(Verdict.ECHO, f"mirrors the bridge's write {write.write_id}: no new change")
    if change.caused_by is not None:
        return Decision(
            Verdict.ECHO, f"caused by the bridge's write {change.caused_by}: no new change"
        )
    # A person changed the shop well after these writes: the shop had applied them by then,
    # and the ones not echoed yet changed nothing there (the shop held their status). A write
    # younger than that may still be applied after the person's change, and echo then.
    for pending in [w for w in state.writes if w.written_at < change.at - echo_latency]:
        state.writes.remove(pending)
        state.closed_writes[pending.write_id] = "lapsed"
    return contend(state, Winner(change.status, stamp, SHOP, change.event_id))


def beats(challenger: Stamp, current: Winner | None) -> bool:
    """A change stamped ``challenger`` would take the winner's place."""
    if current is None:
        return True
    precise_and_earlier = not challenger.whole_seconds and challenger.at < current.earliest
    return newer(challenger, current.stamp) and not precise_and_earlier


def contend(state: SyncState, challenger: Winner) -> Decision:
    """``challenger``, a person's change, takes the winner's place if it is newer."""
    current = state.winner
    if current is None:
        state.winner = challenger
        return Decision(Verdict.WINS, "the newest change a person made")
    if beats(challenger.stamp, current):
        floor = max(current.earliest, challenger.stamp.at)
        state.winner = Winner(
            challenger.status, challenger.stamp, challenger.side, challenger.event_id, floor
        )
        return Decision(Verdict.WINS, "the newest change a person made")
    return Decision(
        Verdict.OLDER,
        f"older than the winner: {current.side}'s {status_name(current.status)} of "
        f"{_fmt(current.stamp.at)}",
    )


def learn_held(state: SyncState, side: Side, status: int | None, stamp: Stamp) -> None:
    """``side`` held ``status`` as of ``stamp``, unless it is known to hold a later one."""
    held = state.edrone if side == EDRONE else state.shop
    if side == EDRONE:
        _see_edrone(state, status, stamp.at)
    if held is None or not newer(held.stamp, stamp):
        value = Held(status, stamp)
        if side == EDRONE:
            state.edrone = value
        else:
            state.shop = value


_STATUS_BIT = {0: 1, 1: 2, None: 4}


def _see_edrone(state: SyncState, status: int | None, at: datetime) -> None:
    second = at.replace(microsecond=0)
    if state.edrone_second is None or second > state.edrone_second:
        state.edrone_second, state.edrone_seen = second, _STATUS_BIT[status]
    elif second == state.edrone_second:
        state.edrone_seen |= _STATUS_BIT[status]


def edrone_certain(state: SyncState) -> bool:
    """What edrone holds is known: it was seen holding one status only in its latest second."""
    return state.edrone is not None and state.edrone_seen in (1, 2, 4)


def _acknowledged_trace(
    state: SyncState, change: EdroneChange, skew: timedelta
) -> OpenTrace | None:
    """The oldest open trace of this status that the webhook may answer: edrone posts it after
    processing the trace, so it is dated no earlier than the trace was sent (less the skew)."""
    for trace in state.traces:
        if trace.status == change.status and change.at >= trace.sent_at - skew:
            return trace
    return None


def _close_acknowledged(state: SyncState, trace: OpenTrace) -> None:
    """Only this trace is settled: edrone processes traces in order, but its webhooks come in
    any, so an earlier trace's acknowledgement may still be on its way (one that changed
    nothing at edrone never comes, and lapses)."""
    state.traces.remove(trace)
    state.trace_updates[trace.id] = "acknowledged"


def _echoed_write(
    state: SyncState, change: ShopChange, tolerance: timedelta, echo_latency: timedelta
) -> PendingWrite | None:
    """The write a shop change echoes: named by its caused_by, or else the oldest pending write
    of the same status that it follows within the echo latency (an echo comes after its write:
    a change made before the write was even published is a person's, and so is one made
    longer after it than the shop takes to apply a write)."""
    if change.caused_by is not None:
        return next((w for w in state.writes if w.write_id == change.caused_by), None)
    if change.names_causes:
        return None
    for write in state.writes:
        if (
            write.status == change.status
            and write.written_at - tolerance <= change.at <= write.written_at + echo_latency
        ):
            return write
    return None


def lapse(state: SyncState, now: datetime, window: timedelta) -> None:
    """Close traces never acknowledged and writes never echoed within ``window``: a trace
    that changed nothing at edrone, a write the shop applied without an echo."""
    for trace in [t for t in state.traces if t.sent_at < now - window]:
        state.traces.remove(trace)
        state.trace_updates[trace.id] = "lapsed"
    for write in [w for w in state.writes if w.written_at < now - window]:
        state.writes.remove(write)
        state.closed_writes[write.write_id] = "lapsed"


# --- what each side must be told -------------------------------------------------------------


def edrone_needs_trace(state: SyncState) -> bool:
    """edrone is not known to hold the winner (see :func:`edrone_certain`). A trace still being
    sent does not count: its sender may have died (its message then comes back), and a second
    trace of the same status changes nothing at edrone."""
    winner = state.winner
    if winner is None:
        return False
    return not edrone_certain(state) or state.edrone.status != winner.status  # type: ignore[union-attr]


def trace_in_flight(state: SyncState, now: datetime, grace: timedelta) -> bool:
    """A trace of the winner's status is being sent, for less than ``grace``: its answer will
    tell what edrone holds, so another one now would only repeat it. (After ``grace`` its sender
    must have died.)"""
    winner = state.winner
    return winner is not None and any(
        t.status == winner.status and t.state == SENDING and t.sent_at > now - grace
        for t in state.traces
    )


def shop_needs_write(state: SyncState) -> bool:
    """The shop is not known to hold the winner (an address it never mentioned included)."""
    winner = state.winner
    if winner is None:
        return False
    return state.shop is None or state.shop.status != winner.status


def trace_opened(state: SyncState, trace: OpenTrace) -> None:
    state.traces.append(trace)


def trace_answered(state: SyncState, trace_id: int, state_now: str, at: datetime) -> None:
    """The answer to a trace: a 2xx tells that edrone took its status, at some moment after
    the trace was sent and before ``at``. It is stamped with the earliest of those, its
    sending: a person's change at edrone dated after that may have come after the trace, and
    a webhook of it must not be taken for older than what the trace made edrone hold (edrone
    may apply a trace, then a person's change, before the trace's answer gets back)."""
    trace = next((t for t in state.traces if t.id == trace_id), None)
    if trace is None:
        return  # acknowledged (or superseded) before its answer came back
    state.trace_updates[trace.id] = state_now
    if state_now in OPEN_TRACE_STATES:
        trace.state = state_now
    else:
        state.traces.remove(trace)
    if state_now == SENT:
        learn_held(state, EDRONE, trace.status, Stamp(min(trace.sent_at, at), state.next_seq()))


def wrote(
    state: SyncState, status: int | None, written_at: datetime, write_id: str, *, echoes: bool
) -> None:
    """The bridge wrote ``status`` to the shop: the shop holds it, and (for a shop that
    publishes its own changes) its echo is expected."""
    learn_held(state, SHOP, status, Stamp(written_at, state.next_seq()))
    if echoes:
        state.writes.append(PendingWrite(write_id, status, written_at))


def _fmt(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")
