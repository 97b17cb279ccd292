"""The ``history`` command: everything that happened to one address, both ways, and why the
bridge decided as it did; a table for people or JSON for machines (``bridge.ops.history``)."""

from __future__ import annotations

import argparse
import json

import asyncpg

from bridge.cli.common import Subcommands, UsageError, add_command
from bridge.config import Settings
from bridge.ops import history


def add_commands(commands: Subcommands) -> None:
    parser = add_command(
        commands,
        "history",
        run_history,
        "show every change of one address both ways (edrone's webhooks, the shop's changes, the "
        "bridge's traces and writes), in order, with what the bridge decided and why",
    )
    parser.add_argument("address", metavar="ADDRESS", help="an e-mail address or a phone")
    parser.add_argument("--app", metavar="ID", help="the app (default: every app that knows it)")
    parser.add_argument("--json", action="store_true", help="one JSON document, for machines")


async def run_history(settings: Settings, args: argparse.Namespace) -> int:
    if args.app is not None and args.app not in settings.apps:
        raise UsageError(f"--app {args.app!r} is not a configured app")
    try:
        _, address = history.addresses_of(args.address, settings.phone_region)
    except ValueError as exc:
        raise UsageError(f"ADDRESS: {exc}") from None
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=10,
        server_settings={"search_path": f'"{settings.database_schema}"'},
    )
    try:
        region = settings.phone_region
        apps = [args.app] if args.app else await history.apps_of(conn, args.address, region)
        found = [await history.read_history(conn, app_id, args.address, region) for app_id in apps]
    finally:
        await conn.close()
    if args.json:
        print(json.dumps([h.to_json() for h in found], indent=2, ensure_ascii=False))
    elif not found:
        print(f"the bridge knows nothing of {address}")
    else:
        print("\n\n".join(history.render(h) for h in found))
    return 0
