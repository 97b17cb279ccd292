"""backfill's progress: a bar with rate and ETA on a terminal, structured log lines elsewhere,
and a summary listing the invalid rows."""

from __future__ import annotations

import io

import structlog

from bridge.cli.backfill_report import KEEP_INVALID, Report, summary
from bridge.ops.backfill_runs import Counts, Run
from bridge.ops.backfill_source import Invalid


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_from_a_resumed_runs_count():
    screen = Terminal()
    report = Report(100, Counts(read=40), stream=screen)
    report.page(Counts(read=50, queued=45, skipped=5), [])
    report.close()
    shown = screen.getvalue()
    assert "50/100" in shown and "queued=45" in shown and "skipped=5" in shown


def test_elsewhere_progress_is_logged_with_rate_and_eta():
    with structlog.testing.capture_logs() as logs:
        report = Report(100, Counts(), stream=io.StringIO(), interval_s=0.0)
        report.page(Counts(read=10, queued=9, invalid=1), [Invalid("line 3", "no e-mail")])
    invalid, progress = logs
    assert invalid == {
        "event": "backfill_row_invalid",
        "log_level": "warning",
        "where": "line 3",
        "reason": "no e-mail",
    }
    assert progress["event"] == "backfill_progress"
    assert (progress["read"], progress["queued"], progress["invalid"]) == (10, 9, 1)
    assert progress["rate_per_s"] > 0 and progress["eta_s"] is not None


def test_the_summary_lists_the_first_invalid_rows_and_counts_the_rest():
    report = Report(None, Counts(), stream=io.StringIO())
    rows = [Invalid(f"line {n}", "bad status") for n in range(KEEP_INVALID + 5)]
    with structlog.testing.capture_logs():
        report.page(Counts(read=30, queued=5, invalid=len(rows)), rows)
    job = Run("run-1", "shop1", "file:/tmp/export.csv", counts=Counts(30, 5, 0, len(rows)))
    text = summary(job, report, 0.0)
    assert "backfill of app shop1 from /tmp/export.csv finished (run run-1)" in text
    assert "read 30 rows: 5 queued, 0 skipped" in text and "25 invalid" in text
    assert "    line 0: bad status" in text and "line 20" not in text
    assert "... and 5 more" in text
