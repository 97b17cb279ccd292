"""The convergence oracle on timelines seen in runs, without services: what it lets win."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.convergence.model import EDRONE, SHOP, Made, acceptable, mark_late, mark_swapped

T0 = datetime(2026, 12, 3, 7, 22, 18, 903000, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def seed_302617() -> list[Made]:
    """bus-5676 of seed 302617 (10,000 addresses): edrone's 0 then 1; the bridge's write of
    the 1 published at +4.624 s, applied by the shop at +4.754 s, after a person there set 1
    (+4.675 s) and then 0 (+4.696 s)."""
    return [
        Made(EDRONE, 0, at(0.0), whole_seconds=True),
        Made(EDRONE, 1, at(0.163)),
        Made(SHOP, 1, at(4.675)),
        Made(SHOP, 0, at(4.696)),
    ]


def test_a_same_status_change_before_a_late_echo_may_pass_for_it():
    """The person's 1 may be taken for the write's echo and the late echo for a person's 1:
    both 0 (the person's last change) and 1 (the echo, then taken as newest) may win."""
    made = seed_302617()
    mark_swapped(made, [(at(4.624), 1, at(4.754))], echo_latency_s=1.0)
    assert [c.swapped is not None for c in made] == [False, False, True, False]
    assert acceptable(made) == {0, 1}


def test_without_such_an_echo_only_the_newest_wins():
    """The same changes with the write applied before the person's change (or not at all):
    no doubt, the person's last change alone may win."""
    for echoed in ([], [(at(4.624), 1, at(4.650))], [(at(2.0), 1, at(4.754))]):
        made = seed_302617()
        mark_swapped(made, echoed, echo_latency_s=1.0)
        assert all(c.swapped is None for c in made)
        assert acceptable(made) == {0}


def seed_10327() -> list[Made]:
    """bus-1657 of seed 10327 (2,000 addresses, in CI): six changes at edrone, the last a 1 at
    +7.785 s; no person changed the shop."""
    return [
        Made(EDRONE, 0, at(0.0), whole_seconds=True),
        Made(EDRONE, 1, at(0.058)),
        Made(EDRONE, 0, at(3.769), whole_seconds=True),
        Made(EDRONE, 1, at(4.298)),
        Made(EDRONE, 0, at(4.477), whole_seconds=True),
        Made(EDRONE, 1, at(7.785)),
    ]


def test_an_echo_applied_later_than_the_echo_latency_may_pass_for_a_person():
    """The bridge's write of 0 published at +11.799 s and applied by the shop at +13.188 s,
    1.39 s later, past the 1 s the bridge is told: its echo is a person's 0 to the bridge."""
    made = seed_10327()
    late = mark_late(made, [(at(10.831), 1, at(11.745)), (at(11.799), 0, at(13.188))], 1.0)
    assert late == 1
    assert [(c.side, c.status, c.doubtful) for c in made][-1] == (SHOP, 0, True)
    assert acceptable(made) == {0, 1}


def test_echoes_within_the_latency_add_nothing():
    made = seed_10327()
    assert mark_late(made, [(at(10.831), 1, at(11.745))], echo_latency_s=1.0) == 0
    assert acceptable(made) == {1}
