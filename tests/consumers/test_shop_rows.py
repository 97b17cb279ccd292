"""The rule for the shop's rows (consumers/shop_rows.py) on its own: a row read by backfill or
reconcile contends only where the shop changed unseen, is dated by what is known, and never
resubscribes an address the bridge knows unsubscribed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from consumers.shop_rows import RowReading, on_shop_row
from consumers.sync import (
    EdroneChange,
    ShopChange,
    SyncState,
    Verdict,
    edrone_needs_trace,
    on_shop_change,
    on_webhook,
    shop_needs_write,
    wrote,
)

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
FLOOR = datetime(2000, 1, 1, tzinfo=UTC)
MARGIN = timedelta(seconds=5)
SKEW = timedelta(minutes=5)
AGENT_SUBSCRIBED, CUSTOMER_UNSUBSCRIBED = 11, 1


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def row(status: int | None, read: float, changed: float | None = None) -> RowReading:
    changed_at = at(changed) if changed is not None else None
    return RowReading(status, at(read), f"row-{status}-{read}-{changed}", changed_at)


def read(state: SyncState, reading: RowReading) -> Verdict:
    return on_shop_row(state, reading, floor=FLOOR, margin=MARGIN).decision


def unsubscribed_at_edrone(seconds: float, *, written: float | None = None) -> SyncState:
    """edrone's unsubscribe won, and (``written``) the bridge wrote it to the shop."""
    state = SyncState()
    change = EdroneChange(0, at(seconds), "w", CUSTOMER_UNSUBSCRIBED, "email")
    assert on_webhook(state, change, SKEW).decision == Verdict.WINS
    if written is not None:
        wrote(state, 0, at(written), "write-1", echoes=False)
    return state


class TestNothingNew:
    def test_a_row_the_bridge_knows_the_shop_holds_is_a_duplicate(self):
        state = SyncState()
        on_shop_change(state, ShopChange(1, at(0), "s0"))
        assert read(state, row(1, 60)) == Verdict.DUPLICATE
        assert state.winner is not None and state.winner.event_id == "s0"

    def test_a_row_read_before_the_bridge_last_learned_the_shop_is_stale(self):
        """Read before a write of the bridge's was committed: the row shows the status from
        before the write, and must not undo it."""
        state = unsubscribed_at_edrone(10, written=20)
        assert read(state, row(1, 19)) == Verdict.OLDER
        assert read(state, row(1, 24)) == Verdict.OLDER  # within the margin of the write
        assert state.shop is not None and state.shop.status == 0
        assert state.winner is not None and state.winner.status == 0


class TestNewAddresses:
    def test_an_undated_row_of_an_address_never_heard_of_wins_as_old_as_can_be(self):
        state = SyncState()
        assert read(state, row(1, 60)) == Verdict.WINS
        assert state.winner is not None and state.winner.stamp.at == FLOOR
        assert edrone_needs_trace(state)
        # Any later change made anywhere beats it.
        late = EdroneChange(0, at(-3600), "w", CUSTOMER_UNSUBSCRIBED, "email")
        assert on_webhook(state, late, SKEW).decision == Verdict.WINS

    def test_a_dated_row_wins_by_its_date(self):
        state = SyncState()
        assert read(state, row(0, 60, changed=30)) == Verdict.WINS
        assert state.winner is not None and state.winner.stamp.at == at(30)
        assert state.shop is not None and state.shop.stamp.at == at(60)


class TestChangedUnseen:
    def test_an_unsubscribe_made_unseen_after_the_bridges_write_wins(self):
        """SQL with the trigger off, after the bridge wrote edrone's subscribe."""
        state = SyncState()
        on_webhook(state, EdroneChange(1, at(0), "w", AGENT_SUBSCRIBED, "email"), SKEW)
        wrote(state, 1, at(1), "write-1", echoes=False)
        assert read(state, row(0, 600)) == Verdict.WINS
        assert state.winner is not None and state.winner.status == 0
        assert state.winner.stamp.at == at(600)
        assert edrone_needs_trace(state) and not shop_needs_write(state)

    def test_an_older_dated_row_loses_and_the_shop_is_brought_back(self):
        """A restored backup: the row's own date is older than the winner."""
        state = unsubscribed_at_edrone(100, written=101)
        assert read(state, row(1, 600, changed=50)) == Verdict.OLDER
        assert state.shop is not None and state.shop.status == 1
        assert shop_needs_write(state)
        assert state.winner is not None and state.winner.status == 0

    def test_undated_in_unknown_order_an_unsubscribe_goes_first(self):
        """The bridge never learned what the shop holds: whether the shop's status or the
        winner came later is unknown."""
        state = SyncState()
        on_webhook(state, EdroneChange(1, at(0), "w", AGENT_SUBSCRIBED, "email"), SKEW)
        assert read(state, row(0, 600)) == Verdict.WINS
        other = unsubscribed_at_edrone(0)
        assert read(other, row(1, 600)) == Verdict.OLDER
        assert other.winner is not None and other.winner.status == 0
        assert shop_needs_write(other)


class TestNeverResubscribes:
    def test_a_newer_dated_subscribe_over_a_known_unsubscribe_is_kept_for_a_person(self):
        state = unsubscribed_at_edrone(100, written=101)
        decision = on_shop_row(state, row(1, 600, changed=500), floor=FLOOR, margin=MARGIN)
        assert decision.decision == Verdict.KEPT
        assert "left for a person" in decision.why
        assert state.winner is not None and state.winner.status == 0
        # Not learnt as the shop's status: the shop is not written back over it either.
        assert state.shop is not None and state.shop.status == 0
        assert not shop_needs_write(state)

    def test_an_undated_subscribe_after_the_bridges_unsubscribe_is_kept(self):
        state = unsubscribed_at_edrone(100, written=101)
        assert read(state, row(1, 600)) == Verdict.KEPT

    def test_an_unknown_status_over_a_known_unsubscribe_is_no_resubscribe(self):
        state = unsubscribed_at_edrone(100, written=101)
        assert read(state, row(None, 600, changed=500)) == Verdict.WINS
        assert state.winner is not None and state.winner.status is None


def test_a_second_reading_of_the_same_row_is_nothing_new():
    """What backfill run twice does: the first reading is learnt, the second is known."""
    state = SyncState()
    assert read(state, row(1, 60)) == Verdict.WINS
    assert read(state, row(1, 120)) == Verdict.DUPLICATE
