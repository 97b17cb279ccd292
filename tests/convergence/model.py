"""The model of the convergence test: random timelines of people changing one address's status on
either side, and the oracle that says which status must win (docs/design.md promise 6)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime

EDRONE, SHOP = "edrone", "shop"
INITIAL = 1  # every address starts subscribed on both sides


@dataclass(frozen=True)
class Planned:
    """A person's change, as planned: ``after_s`` from the start of its address's timeline."""

    after_s: float
    side: str
    status: int


@dataclass
class Made:
    """A person's change as it was made: its true time, and (edrone's) whether its date was
    written to the second only, so that the oracle compares at the sources' resolution."""

    side: str
    status: int
    at: datetime
    whole_seconds: bool = False
    # A shop change the bridge cannot tell from the echo of its own write (see ``doubtful``).
    doubtful: bool = False
    # A shop change the bridge may take for the echo of a write whose real echo comes later,
    # and that echo for a person's change: the echo as that change would then stand (see
    # ``mark_swapped``). Never in ``Timeline.made``: the oracle weighs one or the other.
    swapped: Made | None = None


@dataclass
class Timeline:
    mode: str
    email: str
    start_s: float
    planned: list[Planned]
    made: list[Made] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.mode} {self.email}: start +{self.start_s:.3f} s"]
        for change in self.made:
            precision = " (whole-second date)" if change.whole_seconds else ""
            if change.doubtful:
                precision += " (looks like the echo of the bridge's write)"
            if change.swapped is not None:
                at = change.swapped.at.isoformat(timespec="milliseconds")
                precision += f" (may pass for the echo of the bridge's write, echoed at {at})"
            lines.append(
                f"  {change.at.isoformat(timespec='milliseconds')} {change.side:<6} "
                f"sets {change.status}{precision}"
            )
        return "\n".join(lines)


def timelines(
    rng: random.Random,
    mode: str,
    count: int,
    *,
    spread_s: float,
    min_gap_s: float,
    max_gap_s: float,
) -> list[Timeline]:
    """``count`` addresses, each with 2 to 8 changes on random sides, gaps drawn log-uniformly
    between ``min_gap_s`` and ``max_gap_s``, starts spread over ``spread_s``."""
    made = []
    for n in range(count):
        after = 0.0
        planned = []
        for _ in range(rng.randint(2, 8)):
            after += math.exp(rng.uniform(math.log(min_gap_s), math.log(max_gap_s)))
            planned.append(Planned(after, rng.choice((EDRONE, SHOP)), rng.randint(0, 1)))
        made.append(Timeline(mode, f"{mode}-{n}@example.com", rng.uniform(0, spread_s), planned))
    return made


def mark_doubtful(
    made: list[Made], unechoed: list[tuple[datetime, int]], echo_latency_s: float
) -> None:
    """A shop that names no causes: a person's change to the status of one of the bridge's
    writes, made less than the echo latency after it, when that write changed nothing at the
    shop (so its echo never came), is to the bridge what the write's echo would be. Such a
    change may count or not (docs/design.md, "Two-way sync", the echo contract)."""
    for change in made:
        if change.side == SHOP:
            change.doubtful = any(
                status == change.status
                and 0 <= (change.at - published).total_seconds() < echo_latency_s
                for published, status in unechoed
            )


def mark_swapped(
    made: list[Made], echoed: list[tuple[datetime, int, datetime]], echo_latency_s: float
) -> None:
    """A shop that names no causes, and applies the bridge's write late: a person's change to
    the write's status, made after the write was published (within the echo latency) but before
    the shop applied it, looks to the bridge like the write's echo, and the real echo, which
    comes later, like a person's change. The two shop events say the same, so neither reading
    can be ruled out (docs/design.md, the echo contract); ``echoed`` holds (published_at,
    status, applied_at) of the writes that did change the shop."""
    for change in made:
        if change.side != SHOP or change.swapped is not None:
            continue
        for published, status, applied in echoed:
            since_s = (change.at - published).total_seconds()
            if status == change.status and 0 <= since_s < echo_latency_s and change.at < applied:
                change.swapped = Made(SHOP, status, applied)
                break


def mark_late(
    made: list[Made], echoed: list[tuple[datetime, int, datetime]], echo_latency_s: float
) -> int:
    """A shop that names no causes and applies one of the bridge's writes later than the echo
    latency the bridge is configured with breaks the echo contract: to the bridge, that echo
    is a person's change then (docs/design.md, the echo contract). It is added to ``made`` as a
    doubtful shop change at its applying, which the oracle weighs both ways; how many were."""
    late = [
        Made(SHOP, status, applied, doubtful=True)
        for published, status, applied in echoed
        if (applied - published).total_seconds() >= echo_latency_s
    ]
    made.extend(late)
    made.sort(key=lambda change: change.at)
    return len(late)


def acceptable(made: list[Made]) -> set[int]:
    """The statuses that may win: the newest change's; where a change of another status ties
    with it at the coarser resolution of the two (an edrone date to the second), that one's
    too (the bridge breaks such ties by the order it learned them); and, for every choice of
    doubtful changes left out, and of swapped ones taken as their echo, what wins then."""
    choices = [c for c in made if c.doubtful or c.swapped is not None]
    if choices:
        statuses: set[int] = set()
        for mask in range(2 ** len(choices)):
            chosen = {id(c) for n, c in enumerate(choices) if mask >> n & 1}
            reading = []
            for change in made:
                if id(change) not in chosen:
                    reading.append(change)
                elif change.swapped is not None:
                    reading.append(change.swapped)  # this one was the echo; the echo, a person's
            statuses |= _acceptable(reading) or {INITIAL}
        return statuses
    return _acceptable(made)


def _acceptable(made: list[Made]) -> set[int]:
    if not made:
        return set()
    newest = max(made, key=lambda change: change.at)
    statuses = {newest.status}
    for change in made:
        if change is not newest and _tie(change, newest):
            statuses.add(change.status)
    return statuses


def _tie(a: Made, b: Made) -> bool:
    if a.whole_seconds or b.whole_seconds:
        return a.at.replace(microsecond=0) == b.at.replace(microsecond=0)
    return a.at == b.at
