"""The ``prune`` command: retention for the tables that grow with every event
(``bridge.ops.prune``)."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

from bridge.cli.common import Subcommands, UsageError, add_command, positive_float, positive_int
from bridge.config import Settings
from bridge.db import close_pool, create_pool
from bridge.ops import prune


def add_commands(commands: Subcommands) -> None:
    parser = add_command(
        commands,
        "prune",
        run_prune,
        "delete what is older than --older-than DAYS from the inbox, the sent outbox and dispatch "
        "rows and the history, in small batches while the bridge runs",
    )
    parser.add_argument(
        "--older-than", type=positive_float, required=True, metavar="DAYS", help="at least 1"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=5_000, help="rows per transaction (5000)"
    )
    parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    parser.add_argument("--json", action="store_true", help="one JSON document, for machines")


async def run_prune(settings: Settings, args: argparse.Namespace) -> int:
    older_than = timedelta(days=args.older_than)
    if older_than < prune.MIN_AGE:
        raise UsageError(f"--older-than must be at least {prune.MIN_AGE.days} day")
    pool = await create_pool(settings, command_timeout_s=60.0)
    try:
        rows = await prune.prune(pool, older_than, batch_size=args.batch_size, dry_run=args.dry_run)
    finally:
        await close_pool(pool, 10.0)
    if args.json:
        print(
            json.dumps({"older_than_days": args.older_than, "dry_run": args.dry_run, "rows": rows})
        )
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for table, count in rows.items():
        print(f"{table}: {verb} {count:,} rows older than {args.older_than:g} days")
    return 0
