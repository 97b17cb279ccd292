"""The ``reconcile`` command: where the shop's mapped table, the sync state and (given an export
file) edrone differ, per address, and why; ``--repair`` hands the differences to the consumers
(``bridge.ops.reconcile``). Lines for people, JSON lines for machines, streamed as found."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bridge.cli.common import (
    EXIT_DRIFT,
    Subcommands,
    UsageError,
    add_command,
    positive_int,
)
from bridge.config import Settings
from bridge.db import close_pool, create_pool
from bridge.ops import reconcile
from bridge.ops.drift import Difference, why
from bridge.ops.edrone_export import ExportError
from bridge.shop_table import resolve_target


def add_commands(commands: Subcommands) -> None:
    parser = add_command(
        commands,
        "reconcile",
        run_reconcile,
        "compare the shop's mapped table with the sync state (and edrone, given an export "
        "file) and list the addresses that differ, with why; exit "
        f"{EXIT_DRIFT} when any does",
    )
    parser.add_argument("--app", metavar="ID", required=True, help="the app to reconcile")
    parser.add_argument(
        "--edrone-export",
        type=Path,
        metavar="FILE",
        help="edrone's customers exported from its panel (CSV with a header, or JSON lines: "
        "email, subscriber_status, phone, sms_subscriber_status, changed_at); without it "
        "edrone's side is judged only by what the bridge knows",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="hand each difference to the consumers, which apply the newest: the shop's rows "
        "to the trace forwarder, the export's lines to the subscription consumer",
    )
    parser.add_argument(
        "--limit", type=positive_int, metavar="N", help="list at most N addresses (all counted)"
    )
    parser.add_argument("--json", action="store_true", help="JSON lines, for machines")


async def run_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    app = settings.apps.get(args.app)
    if app is None:
        raise UsageError(f"--app {args.app!r} is not a configured app")
    if app.target is None:
        raise UsageError(f"app {args.app!r} has no [apps.{args.app}.target]: no table to compare")
    pool = await create_pool(settings, command_timeout_s=600.0, max_size=2)
    try:
        target = await resolve_target(pool, args.app, app.target)
        repair = (lambda: reconcile.repairing(settings, args.app)) if args.repair else None
        show = _json_line if args.json else _text_line
        try:
            report = await reconcile.reconcile(
                pool,
                settings,
                target,
                export=args.edrone_export,
                limit=args.limit,
                show=show,
                repair=repair,
            )
        except ExportError as exc:
            raise UsageError(f"--edrone-export: {exc}") from None
    finally:
        await close_pool(pool, 10.0)
    if args.json:
        print(json.dumps({"summary": report.to_json()}, ensure_ascii=False), flush=True)
    else:
        _text_summary(report)
    return EXIT_DRIFT if report.total else 0


def _json_line(d: Difference) -> None:
    print(json.dumps(d.to_json(), ensure_ascii=False), flush=False)


def _text_line(d: Difference) -> None:
    winner = d.winner or "-"
    print(f"{d.channel:5} {d.address}  {d.kind}  winner={winner}  {why(d)}")


def _text_summary(report: reconcile.Report) -> None:
    if report.export_rows is None:
        print("edrone's side not compared: no --edrone-export (edrone has no API to read back)")
    else:
        print(f"edrone's export: {report.export_rows:,} addresses compared")
    if not report.total:
        print(f"app {report.app_id}: no drift")
        return
    shown = f" ({report.listed:,} listed)" if report.listed < report.total else ""
    print(f"app {report.app_id}: {report.total:,} addresses differ{shown}")
    for kind, number in sorted(report.counts.items()):
        print(f"  {kind}: {number:,}")
    if report.repaired:
        done = ", ".join(f"{name} {n:,}" for name, n in sorted(report.repaired.items()))
        print(f"repair handed to the consumers: {done}")
