"""``backfill``: the shop's current statuses, page by page from a source (its mapped table or a
file), sent to edrone as traces through the forwarder's background lane (``RowLane``).

A page's rows are checked first (each a valid ``ShopRow``, or counted and reported as invalid),
and the rows whose every address the bridge already knows the shop holds are skipped: so a
second complete run publishes nothing. The rest are published, confirmed, and only then is the
page's end checkpointed: a run stopped anywhere resumes from its last checkpoint, its run_id
kept, so the rows published again have the same ids and the forwarder takes them for
duplicates. Which row wins over what the bridge knows is the forwarder's rule
(consumers/shop_rows.py), not decided here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
from pydantic import ValidationError

from bridge.ops import backfill_runs as runs
from bridge.ops.backfill_runs import Counts, Run
from bridge.ops.backfill_source import Candidate, Invalid, Page, Source
from bridge.ops.row_lane import RowLane
from schemas.fields import PHONE_REGION_CONTEXT
from schemas.shop_row import ShopRow, row_event_id

# Per address of the page's rows (its index among them): is there a sync state, and does the
# bridge know the shop holds this status?
_KNOWN_SQL = """
SELECT k.i, s.app_id IS NOT NULL AS tracked,
       coalesce(s.shop_known AND s.shop_status IS NOT DISTINCT FROM k.status, false) AS held
FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::smallint[])
     AS k(i, app_id, channel, address, status)
LEFT JOIN sync_state AS s USING (app_id, channel, address)
"""
NEW, KNOWN, DIFFERS = "new", "known", "differs"
STATUS_NAMES = {1: "subscribed", 0: "unsubscribed", None: "unknown"}

# Called after each page: the counts so far and the page's invalid rows.
Progress = Callable[[Counts, Sequence[Invalid]], None]
# What the forwarder's rule would decide of rows, one verdict per address they speak of.
Judge = Callable[[Sequence[ShopRow]], Awaitable[Sequence[str]]]


def addresses(row: ShopRow) -> list[tuple[str, str, int | None]]:
    """(channel, address, status) a row speaks of, as the forwarder reads it: the e-mail, and
    the phone where the row gives an SMS status."""
    found = [("email", row.email, row.subscriber_status)]
    if row.phone and row.sms_subscriber_status is not None:
        found.append(("sms", row.phone, row.sms_subscriber_status))
    return found


@dataclass
class Checked:
    """A page checked: its valid rows, each address's class (new, known, differs), the rest."""

    rows: list[ShopRow]
    classes: list[list[str]]
    invalid: list[Invalid]

    def sending(self) -> list[ShopRow]:
        """The rows with an address whose status the bridge does not know the shop holds."""
        return [
            row
            for row, classes in zip(self.rows, self.classes, strict=True)
            if any(c != KNOWN for c in classes)
        ]


@dataclass(frozen=True)
class Reader:
    """Turns a source's pages into checked shop rows of ``app_id`` for ``run_id``."""

    pool: asyncpg.Pool
    app_id: str
    run_id: str
    phone_region: str

    def shop_row(self, candidate: Candidate) -> ShopRow:
        """The candidate as a row, its id its run's (``ValidationError`` if it is none)."""
        row = ShopRow.model_validate(
            {
                **candidate.fields,
                "event_id": "-",
                "app_id": self.app_id,
                "observed_at": candidate.observed_at,
                "source": "backfill",
                "run_id": self.run_id,
            },
            context={PHONE_REGION_CONTEXT: self.phone_region},
        )
        # Named by its normalised fields: the same row read again is the same message.
        event_id = row_event_id(
            self.run_id,
            self.app_id,
            row.email,
            row.subscriber_status,
            row.phone,
            row.sms_subscriber_status,
            row.changed_at,
        )
        return row.model_copy(update={"event_id": event_id})

    async def check(self, page: Page) -> Checked:
        rows, invalid = [], []
        for read in page.rows:
            if isinstance(read, Invalid):
                invalid.append(read)
                continue
            try:
                rows.append(self.shop_row(read))
            except ValidationError as exc:
                invalid.append(Invalid(read.where, _why(exc)))
        keys = [(i, *address) for i, row in enumerate(rows) for address in addresses(row)]
        classes: list[list[str]] = [[] for _ in rows]
        if keys:
            columns = [
                [k[0] for k in keys],
                [self.app_id] * len(keys),
                [k[1] for k in keys],
                [k[2] for k in keys],
                [k[3] for k in keys],
            ]
            for found in await self.pool.fetch(_KNOWN_SQL, *columns):
                known = KNOWN if found["held"] else DIFFERS
                classes[found["i"]].append(known if found["tracked"] else NEW)
        return Checked(rows, classes, invalid)


async def run(
    reader: Reader,
    source: Source,
    job: Run,
    lane: RowLane,
    conn: asyncpg.Connection,
    progress: Progress,
) -> Run:
    """Send ``source`` from ``job``'s position to its end; checkpointed on ``conn`` (the one
    holding the app's lock) after every confirmed page, and finished at the end."""
    async for page in source.pages(job.position):
        checked = await reader.check(page)
        sending = checked.sending()
        await lane.send(sending)
        job.position = page.position
        job.counts.add(
            Counts(
                read=page.read,
                queued=len(sending),
                skipped=len(checked.rows) - len(sending),
                invalid=len(checked.invalid),
            )
        )
        await runs.checkpoint(conn, job)
        progress(job.counts, checked.invalid)
    await runs.finish(conn, job)
    return job


@dataclass
class Tally:
    """What a run would do (``--dry-run``): counts, statuses and classes per address, the
    forwarder's verdicts on the rows it would be sent, and a sample of those rows."""

    counts: Counts = field(default_factory=Counts)
    statuses: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    sample: list[ShopRow] = field(default_factory=list)


async def dry_run(
    reader: Reader,
    source: Source,
    position: object,
    *,
    judge: Judge | None,
    sample: int,
    progress: Progress,
) -> Tally:
    """Read ``source`` from ``position`` as a run would, publishing and recording nothing."""
    tally = Tally()
    async for page in source.pages(position):
        checked = await reader.check(page)
        sending = checked.sending()
        for row, classes in zip(checked.rows, checked.classes, strict=True):
            tally.classes.update(classes)
            tally.statuses[f"email {STATUS_NAMES[row.subscriber_status]}"] += 1
            if row.phone:
                tally.statuses[f"sms {STATUS_NAMES[row.sms_subscriber_status]}"] += 1
        if judge is not None and sending:
            tally.verdicts.update(await judge(sending))
        tally.sample.extend(sending[: max(sample - len(tally.sample), 0)])
        tally.counts.add(
            Counts(page.read, len(sending), len(checked.rows) - len(sending), len(checked.invalid))
        )
        progress(tally.counts, checked.invalid)
    return tally


def _why(exc: ValidationError) -> str:
    """Which fields are wrong and why, without their values."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'row'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )
