"""The ``backfill`` command: the shop's current statuses sent to edrone as traces, through the
trace forwarder's background lane (``bridge.ops.backfill``). Glue only: it checks the
arguments, opens the source, the run and the lane, and (``--dry-run``) lends the forwarder's
rule to tell what would happen."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bridge.cli.backfill_report import Report, dry_run_summary, summary
from bridge.cli.common import CommandFailed, Subcommands, UsageError, add_command, positive_int
from bridge.config import Settings
from bridge.db import close_pool, create_pool
from bridge.migrate import pending
from bridge.ops import backfill, backfill_runs
from bridge.ops.backfill_file import FileSource, format_of
from bridge.ops.backfill_runs import Counts, RunRefused
from bridge.ops.backfill_source import Source, SourceError
from bridge.ops.backfill_table import TableSource, primary_key
from bridge.ops.row_lane import open_lane
from bridge.shop_table import resolve_target
from consumers.convergence import Converger, shop_keys, utcnow
from consumers.sync_peek import peek
from consumers.sync_store import SyncBatch
from schemas.shop_row import ShopRow

DRY_RUN_ID = "dry-run"


def add_commands(commands: Subcommands) -> None:
    parser = add_command(
        commands,
        "backfill",
        run_backfill,
        "send the shop's current statuses to edrone as traces, from the app's mapped table or "
        "a CSV or JSON-lines file, through the trace forwarder's background lane (run `consume "
        "traces` to send them); rows the bridge knows the shop holds are skipped, and a run "
        "stopped anywhere resumes where it stopped when run again",
    )
    parser.add_argument("--app", required=True, metavar="ID", help="the app (shop) to backfill")
    parser.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help="read this file instead of [apps.<ID>.target]: CSV with a header, or JSON lines, "
        "with email, subscriber_status (1/0/empty or subscribed/unsubscribed), phone, "
        "sms_subscriber_status, changed_at (ISO 8601)",
    )
    parser.add_argument(
        "--format", choices=("csv", "jsonl"), help="the file's format (default: by its name)"
    )
    parser.add_argument(
        "--observed-at",
        type=_instant,
        metavar="ISO",
        help="when the shop exported the file (default: its modification time): it held "
        "these statuses then, so anything the bridge learned later is newer",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read the source and print what would be sent; publish and record nothing",
    )
    parser.add_argument(
        "--sample", type=int, default=10, metavar="N", help="rows shown by --dry-run (10)"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="give up the source's unfinished run and start from the beginning",
    )
    parser.add_argument(
        "--page-size",
        type=positive_int,
        default=1000,
        metavar="N",
        help="rows read per statement, and checkpointed together (1000)",
    )
    parser.add_argument(
        "--max-queued",
        type=positive_int,
        default=5000,
        metavar="N",
        help="wait while the background lane holds more than N rows (5000)",
    )


async def run_backfill(settings: Settings, args: argparse.Namespace) -> int:
    app = settings.apps.get(args.app)
    if app is None:
        known = ", ".join(sorted(settings.apps)) or "none"
        raise UsageError(f"no app {args.app!r} is configured (configured: {known})")
    if args.file is None and app.target is None:
        raise UsageError(
            f"app {args.app!r} has no [apps.{args.app}.target] table to read: give --file"
        )
    if args.file is None and args.observed_at is not None:
        raise UsageError(
            "--observed-at is for --file: a table's rows are read at the database's clock"
        )
    if args.file is not None and not args.file.is_file():
        raise UsageError(f"no file {args.file}")
    if args.sample < 0:
        raise UsageError("--sample must be 0 or more")
    pool = await create_pool(settings, command_timeout_s=60.0, max_size=3)
    try:
        missing = await pending(pool, settings.database_schema)
        if missing:
            raise CommandFailed(
                f"schema {settings.database_schema} lacks {missing[0]}: run edrone-bridge migrate"
            )
        try:
            source = await _source(pool, settings, args)
        except SourceError as exc:
            raise UsageError(str(exc)) from None
        if args.dry_run:
            return await _dry_run(pool, settings, args, source)
        return await _run(pool, settings, args, source)
    finally:
        await close_pool(pool, 10.0)


async def _source(pool: asyncpg.Pool, settings: Settings, args: argparse.Namespace) -> Source:
    if args.file is not None:
        kind = args.format or format_of(args.file)
        return FileSource(args.file, kind, args.page_size, args.observed_at)
    mapping = settings.apps[args.app].target
    assert mapping is not None
    target = await resolve_target(pool, args.app, mapping)
    return TableSource(pool, target, await primary_key(pool, target), args.page_size)


async def _run(
    pool: asyncpg.Pool, settings: Settings, args: argparse.Namespace, source: Source
) -> int:
    try:
        async with backfill_runs.exclusive(pool, args.app) as conn:
            job = await backfill_runs.start(
                conn, args.app, source.label, source.version, restart=args.restart
            )
            reader = backfill.Reader(pool, args.app, job.run_id, settings.phone_region)
            report = Report(await source.total(), Counts(**vars(job.counts)))
            try:
                lane_name = f"edrone-bridge backfill {args.app}"
                async with open_lane(settings, lane_name, max_depth=args.max_queued) as lane:
                    await backfill.run(reader, source, job, lane, conn, report.page)
            finally:
                report.close()
    except RunRefused as exc:
        raise CommandFailed(str(exc)) from None
    print(summary(job, report, lane.waited_s))
    return 0


async def _dry_run(
    pool: asyncpg.Pool, settings: Settings, args: argparse.Namespace, source: Source
) -> int:
    # What the next run would read: the rest of an unfinished run, unless --restart.
    position, done = None, 0
    found = await backfill_runs.unfinished(pool, args.app, source.label)
    if found is not None and not args.restart:
        resumed = backfill_runs.resumed(found)
        position, done = resumed.position, resumed.counts.read
        print(f"resuming run {resumed.run_id}, after {done:,} rows read")
    reader = backfill.Reader(pool, args.app, DRY_RUN_ID, settings.phone_region)
    total = await source.total()
    report = Report(None if total is None else max(total - done, 0), Counts())
    try:
        tally = await backfill.dry_run(
            reader,
            source,
            position,
            judge=_rule(pool, settings),
            sample=args.sample,
            progress=report.page,
        )
    finally:
        report.close()
    print(dry_run_summary(tally, report, source.label))
    return 0


def _rule(pool: asyncpg.Pool, settings: Settings) -> backfill.Judge:
    """The forwarder's rule on the states as stored (read, never locked or saved)."""
    converger = Converger(settings, {})

    async def judge(rows: Sequence[ShopRow]) -> list[str]:
        async with pool.acquire() as conn:
            states, emails = await peek(
                conn, (k for row in rows for k in shop_keys(row.app_id, row))
            )
            batch = SyncBatch(conn, states, emails)
            now = utcnow()
            return [
                str(decision.decision)
                for row in rows
                for decision in converger.read_shop_row(batch, row, now).values()
            ]

    return judge


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date and time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.utcoffset() is None else value.astimezone(UTC)
