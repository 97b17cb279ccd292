"""The convergence rule on its own (consumers/sync.py), on the timelines issue 10 measured going
wrong: the newest change a person made wins on both sides, acknowledgements and echoes are no
changes, and each side not known to hold the winner is told."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from consumers.sync import (
    SENT,
    EdroneChange,
    OpenTrace,
    ShopChange,
    Stamp,
    SyncState,
    Verdict,
    edrone_needs_trace,
    newer,
    on_shop_change,
    on_webhook,
    shop_needs_write,
    trace_answered,
    trace_opened,
    wrote,
)

# The verdicts by the short names the timelines below read best with.
ACKNOWLEDGED, ECHO, OLDER, WINS = Verdict.ACKNOWLEDGED, Verdict.ECHO, Verdict.OLDER, Verdict.WINS
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
TRACE_SUBSCRIBED, TRACE_UNSUBSCRIBED, CUSTOMER_UNSUBSCRIBED, AGENT_SUBSCRIBED = 10, 6, 1, 11


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def webhook(status, seconds, reason=AGENT_SUBSCRIBED, *, whole=False, event_id=None):
    return EdroneChange(status, at(seconds), event_id or f"w{seconds}", reason, "email", whole)


def shop(status, seconds, *, caused_by=None):
    return ShopChange(status, at(seconds), f"s{seconds}", caused_by)


class Bridge:
    """The rule driven as the consumers drive it: after each change, the side not known to
    hold the winner is told (a trace, answered 200; a write)."""

    def __init__(self) -> None:
        self.state = SyncState()
        self.traces: list[OpenTrace] = []
        self.writes: list[tuple[str, int | None]] = []

    def trace(self, seconds: float, answered: float | None = None) -> OpenTrace:
        """A trace sent at ``seconds``, its 200 back then (or at ``answered``)."""
        winner = self.state.winner
        assert winner is not None
        trace = OpenTrace(
            len(self.traces) + 1, winner.status, winner.stamp.at, at(seconds), "sending"
        )
        trace_opened(self.state, trace)
        self.traces.append(trace)
        trace_answered(self.state, trace.id, SENT, at(seconds if answered is None else answered))
        return trace

    def write(self, seconds: float, *, echoes: bool = True) -> str:
        winner = self.state.winner
        assert winner is not None
        write_id = f"write-{len(self.writes) + 1}"
        wrote(self.state, winner.status, at(seconds), write_id, echoes=echoes)
        self.writes.append((write_id, winner.status))
        return write_id

    def needs_trace(self, seconds: float) -> bool:
        return edrone_needs_trace(self.state)


class TestWinner:
    def test_newest_change_a_person_made_wins_whatever_the_side(self):
        """A shop change newer than edrone's wins, and an edrone change newer than that."""
        bridge = Bridge()
        assert on_webhook(bridge.state, webhook(0, 1), SKEW).decision == WINS
        assert on_shop_change(bridge.state, shop(1, 2)).decision == WINS
        assert on_webhook(bridge.state, webhook(0, 1.5), SKEW).decision == OLDER
        assert on_webhook(bridge.state, webhook(0, 3), SKEW).decision == WINS
        assert (bridge.state.winner.status, bridge.state.winner.side) == (0, "edrone")

    def test_edrone_change_older_than_the_shops_is_recorded_not_applied(self):
        """Mechanism 2: a webhook is compared with the shop's later change too."""
        bridge = Bridge()
        on_shop_change(bridge.state, shop(0, 10))
        decision = on_webhook(bridge.state, webhook(1, 9), SKEW)
        assert decision.decision == OLDER and "shop's unsubscribed" in decision.why
        assert bridge.state.winner.status == 0

    def test_ties_at_whole_seconds_fall_to_the_order_learned(self):
        """edrone's whole-second date ties with a shop change in that second: the one learned
        later wins; finer dates are compared as they are."""
        late = Stamp(at(10.9), seq=2)
        whole = Stamp(at(10), seq=1, whole_seconds=True)
        assert newer(late, whole)
        assert newer(Stamp(at(10), seq=3, whole_seconds=True), late)
        assert not newer(Stamp(at(10.2), seq=3), late)

    def test_ties_do_not_chain(self):
        """A whole-second date that wins by a tie over a millisecond one keeps that one's time
        as its floor: a millisecond change earlier than it cannot win over the tie."""
        bridge = Bridge()
        on_shop_change(bridge.state, shop(1, 28.733))
        assert on_webhook(bridge.state, webhook(1, 28, whole=True), SKEW).decision == WINS
        assert on_webhook(
            bridge.state, webhook(0, 28.528, CUSTOMER_UNSUBSCRIBED), SKEW
        ).decision == (OLDER)
        assert (
            on_webhook(bridge.state, webhook(0, 28.9, CUSTOMER_UNSUBSCRIBED), SKEW).decision == WINS
        )


class TestAcknowledgements:
    def test_trace_processed_after_a_newer_edrone_change_is_corrected(self):
        """The race of the issue: shop 1 at 10 (traced), edrone's person sets 0 at 11, edrone
        processes the trace at 12. The person's 0 wins; edrone holds 1 by then, so a corrective
        trace of 0 is due, in either order of the two webhooks."""
        for order in ("person first", "ack first"):
            bridge = Bridge()
            on_shop_change(bridge.state, shop(1, 10))
            assert bridge.needs_trace(10)
            bridge.trace(10.1)
            person, ack = webhook(0, 11, CUSTOMER_UNSUBSCRIBED), webhook(1, 12, TRACE_SUBSCRIBED)
            changes = [person, ack] if order == "person first" else [ack, person]
            decisions = [on_webhook(bridge.state, change, SKEW).decision for change in changes]
            assert sorted(decisions) == sorted([WINS, ACKNOWLEDGED]), order
            assert (bridge.state.winner.status, bridge.state.edrone.status) == (0, 1), order
            assert bridge.needs_trace(13), order
            assert shop_needs_write(bridge.state), order

    def test_a_person_change_before_the_traces_answer_came_back_is_what_edrone_holds(self):
        """A race CI found (seed 688273): the shop's 0 is traced at 57.889; edrone applies it at
        once (it held 0: no webhook), then its person sets 1 at 57.963, a webhook dated to the
        second; the trace's 200 reaches the bridge at 58.010. edrone holds 1, so the shop's
        later 0 must be traced, not taken for what edrone is known to hold."""
        bridge = Bridge()
        assert on_shop_change(bridge.state, shop(0, 57.786)).decision == WINS
        bridge.trace(57.889, answered=58.010)
        late = webhook(0, 57.632, CUSTOMER_UNSUBSCRIBED)
        assert on_webhook(bridge.state, late, SKEW).decision == OLDER
        assert on_webhook(bridge.state, webhook(1, 57, whole=True), SKEW).decision == WINS
        write_id = bridge.write(60.861)
        assert on_shop_change(bridge.state, shop(1, 60.942)).decision == ECHO, write_id
        assert on_shop_change(bridge.state, shop(0, 61.031)).decision == WINS
        assert bridge.needs_trace(61.1)

    def test_acknowledgement_takes_the_traces_time_not_edrones(self):
        """An acknowledgement is no change of its own: a shop change after the trace but
        before edrone's (later) processing date still wins."""
        bridge = Bridge()
        on_shop_change(bridge.state, shop(1, 10))
        bridge.trace(10.1)
        assert on_shop_change(bridge.state, shop(0, 11)).decision == WINS
        assert on_webhook(bridge.state, webhook(1, 13, TRACE_SUBSCRIBED), SKEW).decision == (
            ACKNOWLEDGED
        )
        assert bridge.state.winner.status == 0
        assert bridge.needs_trace(14)  # edrone holds 1 now: tell it 0

    def test_trace_reason_matching_no_trace_is_a_real_change(self):
        """edrone's storefront script produces TRACE reasons too: without a trace of the
        bridge's with that status, it is a person's change."""
        bridge = Bridge()
        on_shop_change(bridge.state, shop(0, 10))
        assert on_webhook(bridge.state, webhook(1, 11, TRACE_SUBSCRIBED), SKEW).decision == WINS

    def test_noop_only_when_edrone_is_known_to_hold_the_status(self):
        """Nothing is known of edrone at first: trace. Known to hold it: no trace."""
        bridge = Bridge()
        on_shop_change(bridge.state, shop(1, 10))
        assert bridge.needs_trace(10)
        bridge.trace(10)
        on_shop_change(bridge.state, shop(1, 20))
        assert not bridge.needs_trace(20)
        on_webhook(bridge.state, webhook(0, 21, CUSTOMER_UNSUBSCRIBED), SKEW)
        on_shop_change(bridge.state, shop(1, 22))
        assert bridge.needs_trace(22)


class TestEchoes:
    def test_false_echo_of_the_issue(self):
        """Mechanism 1: edrone 0; shop 1 (traced, edrone 1); shop 0 a moment later is a
        person's change, not an echo (the bridge wrote nothing), and it is traced; edrone's
        late acknowledgement of the 1-trace does not write 1 over it."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(0, 6.9, CUSTOMER_UNSUBSCRIBED), SKEW)
        bridge.write(6.95, echoes=False)
        assert on_shop_change(bridge.state, shop(1, 10.43)).decision == WINS
        bridge.trace(10.44)
        assert on_shop_change(bridge.state, shop(0, 11.26)).decision == WINS
        assert bridge.needs_trace(11.27)
        bridge.trace(11.27)
        ack = webhook(1, 10.46, TRACE_SUBSCRIBED)
        assert on_webhook(bridge.state, ack, SKEW).decision == ACKNOWLEDGED
        assert bridge.state.winner.status == 0
        assert not shop_needs_write(bridge.state)

    def test_echo_of_a_later_write_settles_the_earlier_ones(self):
        """A write of the status the shop held has no echo; once a later write's echo comes,
        the earlier one is no longer awaited, so a person's change cannot pass for its echo."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(1, 5), SKEW)
        bridge.write(5.1)  # the shop held 1 already: no echo will come
        on_webhook(bridge.state, webhook(0, 8), SKEW)
        second = bridge.write(8.1)
        assert on_shop_change(bridge.state, shop(0, 8.2, caused_by=second)).decision == ECHO
        assert bridge.state.writes == []
        assert on_shop_change(bridge.state, shop(1, 20)).decision == WINS

    def test_stale_echo_of_an_earlier_write_is_no_change(self):
        """Mechanism 3: writes of 0 then of 1; the shop's late echo of the 0 is matched to
        its write, not taken for a person's change over edrone's newer 1."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(0, 5), SKEW)
        bridge.write(5.1)
        on_webhook(bridge.state, webhook(1, 8), SKEW)
        bridge.write(8.1)
        assert on_shop_change(bridge.state, shop(0, 5.2)).decision == ECHO
        assert on_shop_change(bridge.state, shop(1, 8.2)).decision == ECHO
        assert bridge.state.winner.status == 1
        assert not bridge.needs_trace(9)

    def test_echo_of_an_earlier_write_while_a_later_one_is_on_its_way(self):
        """Found by the model test (seed 816991, bus-2273): writes of 1 then of 0 are on the
        shop's bus; the echo of the 1 comes. The shop will apply the 0 next, so it needs no
        third write (whose no-change would leave an echo awaited that a person's later 0
        could pass for)."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(1, 5), SKEW)
        bridge.write(5.1)
        # A person's 0 from just before, learned now: the winner, which the shop is not known
        # to hold (the write of 1 may come after it), so it is written too.
        assert on_shop_change(bridge.state, shop(0, 5.05)).decision == WINS
        bridge.write(5.2)
        assert on_shop_change(bridge.state, shop(1, 5.3)).decision == ECHO
        assert [w.status for w in bridge.state.writes] == [0]
        assert not shop_needs_write(bridge.state)
        assert on_shop_change(bridge.state, shop(0, 5.4)).decision == ECHO
        assert bridge.state.writes == []
        assert bridge.state.winner.status == 0

    def test_caused_by_names_the_write(self):
        """A shop change carrying caused_by is the echo of that write, whatever its status."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(0, 5), SKEW)
        write_id = bridge.write(5.1)
        assert on_shop_change(bridge.state, shop(0, 5.3, caused_by=write_id)).decision == (ECHO)
        assert bridge.state.writes == []

    def test_write_applied_after_a_persons_change_is_still_its_echo(self):
        """The bridge writes 0; a person sets 1 a moment later; the shop applies the write after
        that and echoes 0: still the write's echo, never a change of anybody's, and since the
        shop then holds 0, the person's 1 (the winner) is to be written back."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(0, 5), SKEW)
        bridge.write(5.1)
        assert on_shop_change(bridge.state, shop(1, 5.2)).decision == WINS
        assert on_shop_change(bridge.state, shop(0, 5.3)).decision == ECHO
        assert bridge.state.winner.status == 1
        assert shop_needs_write(bridge.state)

    def test_person_change_long_after_a_write_ends_the_wait(self):
        """A person's change more than the echo latency after a write: the shop had applied
        it without a change (it held that status), so a later change of that status is a
        person's."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(1, 5), SKEW)
        bridge.write(5.1)  # the shop held 1 already: no echo will come
        assert on_shop_change(bridge.state, shop(0, 20)).decision == WINS
        assert bridge.state.writes == []
        assert on_shop_change(bridge.state, shop(1, 21)).decision == WINS

    def test_no_echo_comes_later_than_the_echo_latency(self):
        """Found by the model test (seed 173759, bus-1524): a write of 1 changed nothing at the
        shop; a person set 0 soon after (the write may still come: it stays awaited), and 17 s
        later a person set 1: too late to be the write's echo, so it is a person's change."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(1, 5), SKEW)
        bridge.write(5.1)  # the shop held 1 already: no echo will come
        assert on_shop_change(bridge.state, shop(0, 5.5)).decision == WINS
        assert len(bridge.state.writes) == 1
        assert on_shop_change(bridge.state, shop(1, 22.5)).decision == WINS
        assert bridge.state.winner.status == 1

    def test_write_overwriting_an_unseen_shop_change_is_corrected(self):
        """The shop set 1 at 11.2, before the bridge wrote edrone's 0 of 11 at 11.5 over it:
        the shop's change is the newer person's change and wins, and since the shop holds the
        bridge's 0 by then, it is written back."""
        bridge = Bridge()
        on_webhook(bridge.state, webhook(0, 11), SKEW)
        bridge.write(11.5, echoes=False)
        assert on_shop_change(bridge.state, shop(1, 11.2)).decision == WINS
        assert shop_needs_write(bridge.state)
        assert bridge.needs_trace(11.6)
