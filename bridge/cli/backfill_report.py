"""What ``backfill`` shows while it runs and when it ends: a progress bar with rate and ETA on
a terminal (tqdm), else a structured log line every few seconds; then a summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

import structlog
from tqdm import tqdm

from bridge.ops.backfill import STATUS_NAMES, Tally
from bridge.ops.backfill_runs import Counts, Run
from bridge.ops.backfill_source import Invalid

log = structlog.get_logger(__name__)

KEEP_INVALID = 20  # invalid rows listed in the summary; all are counted (and logged off a TTY)


class Report:
    """Progress of one run, from ``already`` (a resumed run's counts) towards ``total``."""

    def __init__(
        self,
        total: int | None,
        already: Counts,
        *,
        stream: TextIO = sys.stderr,
        interval_s: float = 5.0,
    ) -> None:
        self.total = total
        self.invalid: list[Invalid] = []
        self._start = already.read
        self._counts = already
        self._interval_s = interval_s
        self._started = self._logged = time.monotonic()
        self._bar: tqdm[None] | None = None
        if stream.isatty():
            self._bar = tqdm(
                total=total, initial=already.read, unit=" rows", file=stream, dynamic_ncols=True
            )

    def page(self, counts: Counts, invalid: Sequence[Invalid]) -> None:
        for row in invalid:
            if len(self.invalid) < KEEP_INVALID:
                self.invalid.append(row)
            if self._bar is None:  # on a terminal the summary lists them, under the bar
                log.warning("backfill_row_invalid", where=row.where, reason=row.reason)
        shown, self._counts = self._counts.read, Counts(**vars(counts))
        if self._bar is not None:
            self._bar.update(counts.read - shown)
            self._bar.set_postfix(
                queued=counts.queued, skipped=counts.skipped, invalid=counts.invalid, refresh=False
            )
            return
        now = time.monotonic()
        if now - self._logged >= self._interval_s:
            self._logged = now
            log.info("backfill_progress", **vars(counts), **self.pace())

    def pace(self) -> dict[str, float | None]:
        """Rows a second this session, and the seconds left at that rate (None: unknown)."""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (self._counts.read - self._start) / elapsed
        left = None
        if self.total is not None and rate > 0:
            left = max(self.total - self._counts.read, 0) / rate
        return {"rate_per_s": round(rate, 1), "eta_s": None if left is None else round(left, 1)}

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def summary(job: Run, report: Report, waited_s: float) -> str:
    counts = job.counts
    lines = [
        f"backfill of app {job.app_id} from {job.source.split(':', 1)[1]} finished "
        f"(run {job.run_id}{', resumed' if job.resumed else ''})",
        f"  read {counts.read:,} rows: {counts.queued:,} queued, {counts.skipped:,} skipped "
        f"(the shop is known to hold them), {counts.invalid:,} invalid",
        f"  {report.pace()['rate_per_s']:,} rows/s over {report.elapsed_s:.1f} s "
        f"({waited_s:.1f} s waiting for the forwarder to make room)",
        *_invalid_lines(report, counts.invalid),
    ]
    return "\n".join(lines)


def dry_run_summary(tally: Tally, report: Report, source: str) -> str:
    counts = tally.counts
    statuses = ", ".join(
        f"{channel} {name} {tally.statuses[f'{channel} {name}']:,}"
        for channel in ("email", "sms")
        for name in STATUS_NAMES.values()
        if tally.statuses[f"{channel} {name}"]
    )
    classes = tally.classes
    lines = [
        f"dry run of {source.split(':', 1)[1]}: nothing published, nothing recorded",
        f"  read {counts.read:,} rows: {counts.queued:,} would be queued, {counts.skipped:,} "
        f"skipped (the shop is known to hold them), {counts.invalid:,} invalid",
        f"  statuses: {statuses or 'none'}",
        f"  addresses: {classes['new']:,} new (no sync state), {classes['known']:,} known "
        f"(skipped), {classes['differs']:,} differ (the forwarder decides by its rule)",
    ]
    if tally.verdicts:
        verdicts = ", ".join(f"{name} {count:,}" for name, count in tally.verdicts.most_common())
        lines.append(f"  the forwarder would decide, per address: {verdicts}")
    if tally.sample:
        lines.append(f"  the first {len(tally.sample)} rows that would be sent:")
        lines += [
            f"    {row.email} subscriber_status={_status(row.subscriber_status)} "
            f"phone={row.phone or '-'} sms_subscriber_status={_status(row.sms_subscriber_status)} "
            f"changed_at={row.changed_at.isoformat() if row.changed_at else '-'}"
            for row in tally.sample
        ]
    lines += _invalid_lines(report, counts.invalid)
    return "\n".join(lines)


def _invalid_lines(report: Report, count: int) -> list[str]:
    if not report.invalid:
        return []
    more = count - len(report.invalid)
    return [
        "  invalid rows (never sent):",
        *(f"    {row.where}: {row.reason}" for row in report.invalid),
        *([f"    ... and {more:,} more"] if more > 0 else []),
    ]


def _status(status: int | None) -> str:
    return "" if status is None else str(status)
