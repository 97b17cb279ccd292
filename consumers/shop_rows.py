"""The shop's rows (``backfill``, ``reconcile``) read into the sync state, as a pure rule beside
``consumers/sync.py``'s.

A row is not a change: it says what the shop held when it was read, and maybe when that status
was set. So it is nothing new where the bridge knows the shop holds it, or knows a later status
of the shop's than the read; else the shop changed unseen (SQL with the trigger off, a restored
backup, a table older than the bridge), and the row contends like a person's change, dated by
its own date, or, without one, by what the bridge knows of the order. Whatever its date, a row
never turns an unsubscribe the bridge knows of into a subscribe: that is left for a person."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from consumers.sync import (
    SHOP,
    Decision,
    Stamp,
    SyncState,
    Verdict,
    Winner,
    beats,
    contend,
    learn_held,
)
from schemas.subscription import status_name

UNSUBSCRIBED, SUBSCRIBED = 0, 1


@dataclass(frozen=True)
class RowReading:
    """One address's status in a shop row, as read at ``observed_at`` (the database's clock);
    ``changed_at`` is when the shop set it, where its table or file keeps that (clamped)."""

    status: int | None
    observed_at: datetime
    event_id: str
    changed_at: datetime | None = None


def on_shop_row(
    state: SyncState, row: RowReading, *, floor: datetime, margin: timedelta
) -> Decision:
    """Read a shop row into ``state``. ``floor`` dates a row older than anything else (the
    date floor); ``margin`` bounds how long before a read a write of the bridge's may have
    been stamped and still be unseen by it (its transaction had not committed)."""
    known = state.shop
    if known is not None and known.stamp.at > row.observed_at - margin:
        return Decision(
            Verdict.OLDER,
            f"read at {_fmt(row.observed_at)}, before the bridge last learned what the shop "
            f"holds ({status_name(known.status)} at {_fmt(known.stamp.at)})",
        )
    if known is not None and known.status == row.status:
        return Decision(Verdict.DUPLICATE, "the bridge knows the shop holds it: nothing new")
    at, dated_why = _dated(state, row, floor)
    stamp = Stamp(at, state.next_seq())
    winner = state.winner
    if (
        winner is not None
        and winner.status == UNSUBSCRIBED
        and row.status == SUBSCRIBED
        and beats(stamp, winner)
    ):
        # Not learnt as what the shop holds either: the shop is not written back over what
        # may be a person's resubscription, and reconcile keeps reporting the difference.
        return Decision(
            Verdict.KEPT,
            f"would resubscribe an address unsubscribed at {_fmt(winner.stamp.at)} "
            f"({winner.side}): left for a person",
        )
    learn_held(state, SHOP, row.status, Stamp(row.observed_at, state.next_seq()))
    decision = contend(state, Winner(row.status, stamp, SHOP, row.event_id))
    return Decision(decision.decision, f"{decision.why}; {dated_why}")


def _dated(state: SyncState, row: RowReading, floor: datetime) -> tuple[datetime, str]:
    """When the row's status counts as set, and why."""
    if row.changed_at is not None:
        return max(row.changed_at, floor), f"dated by the shop at {_fmt(row.changed_at)}"
    known, winner = state.shop, state.winner
    if winner is None:
        return floor, "undated, and nothing else known: as old as can be"
    if known is not None and winner.stamp.at <= known.stamp.at:
        # The shop changed after the bridge last learned what it holds, which was after the
        # winner: later than anything known.
        return row.observed_at, "undated, changed since the bridge last learned the shop's"
    if row.status == UNSUBSCRIBED and winner.status != UNSUBSCRIBED:
        return row.observed_at, "undated and in unknown order: an unsubscribe goes first"
    return floor, "undated and in unknown order: the winner stands"


def _fmt(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")
