"""The ``dlq`` commands: list, show, replay and purge a dead-letter queue. Glue only: the AMQP
work is in ``bridge.ops.dlq``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

from bridge.cli.common import (
    EXIT_FAILED,
    CommandFailed,
    Subcommands,
    UsageError,
    add_command,
    format_age,
    positive_float,
)
from bridge.config import Settings
from bridge.ops import dlq
from bridge.ops.dlq_messages import DeadLetter, decode_body, jsonable

T = TypeVar("T")
ERROR_COLUMN_CHARS = 80


def add_commands(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "dlq",
        help="list, show, replay or purge a dead-letter queue",
        description="List, show, replay or purge the messages of a dead-letter queue. QUEUE is "
        "subscriptions, traces, or a dead-letter queue's full name ({prefix}.traces.dlq).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = _with_queue(
        add_command(
            actions,
            "list",
            run_list,
            "count a dead-letter queue's messages and list each one's id, attempts, age, "
            "original queue and last error, leaving them in place",
        )
    )
    listing.add_argument("--json", action="store_true", help="one JSON document, for machines")
    show = _with_queue(
        add_command(
            actions, "show", run_show, "print one message whole: properties, headers and body"
        )
    )
    show.add_argument("id", metavar="ID", help="the id that `dlq list` shows")
    show.add_argument("--json", action="store_true", help="one JSON document, for machines")
    replay = _with_selection(
        add_command(
            actions,
            "replay",
            run_replay,
            "republish messages to their work queue with attempts reset; each leaves the "
            "dead-letter queue only once the broker confirmed its republish",
        )
    )
    replay.add_argument(
        "--rate", type=positive_float, help="at most this many messages a second (no limit)"
    )
    purge = _with_selection(add_command(actions, "purge", run_purge, "delete messages for good"))
    purge.add_argument("--yes", action="store_true", help="do not ask before --all on a terminal")


def _with_queue(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "queue", metavar="QUEUE", help="subscriptions, traces, or a dead-letter queue's full name"
    )
    return parser


def _with_selection(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _with_queue(parser)
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument(
        "--id",
        dest="ids",
        nargs="+",
        action="extend",
        metavar="ID",
        help="the messages with these ids (as `dlq list` shows them)",
    )
    chosen.add_argument("--all", action="store_true", help="every message of the queue")
    return parser


# --- commands --------------------------------------------------------------------------------


async def run_list(settings: Settings, args: argparse.Namespace) -> int:
    listing = await _checked(dlq.list_messages(settings, args.queue))
    now = datetime.now(UTC)
    if args.json:
        document = {
            "queue": listing.queue,
            "count": listing.count,
            "messages": [message.summary(now) for message in listing.messages],
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(render_listing(listing, now))
    return 0


async def run_show(settings: Settings, args: argparse.Namespace) -> int:
    message = await _checked(dlq.find_message(settings, args.queue, args.id))
    if message is None:
        raise CommandFailed(f"no message with id {args.id!r} in {args.queue}")
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps(message.to_json(now), indent=2, ensure_ascii=False))
    else:
        print(render_message(message, now))
    return 0


async def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    started = time.monotonic()
    outcome = await _checked(dlq.replay(settings, args.queue, ids=args.ids, rate_per_s=args.rate))
    targets = ", ".join(f"{queue} ({n})" for queue, n in outcome.done.items()) or "-"
    print(
        f"replayed {_how_many(outcome, args.ids)} from {outcome.queue} "
        f"in {time.monotonic() - started:.1f} s; to {targets}"
    )
    return _report_leftovers(outcome, "replay")


async def run_purge(settings: Settings, args: argparse.Namespace) -> int:
    if args.all and not args.yes and sys.stdin.isatty() and not await _confirmed(args.queue):
        print("nothing purged")
        return EXIT_FAILED
    outcome = await _checked(dlq.purge(settings, args.queue, ids=args.ids))
    print(f"purged {_how_many(outcome, args.ids)} from {outcome.queue}")
    return _report_leftovers(outcome, "purge")


def _how_many(outcome: dlq.Outcome, ids: list[str] | None) -> str:
    """``4 of 4 messages`` for --all; ``1 of the 2 asked (3 in the queue)`` for --id."""
    if ids is None:
        return f"{outcome.total} of {outcome.count} messages"
    asked = len(dict.fromkeys(ids))
    return f"{outcome.total} of the {asked} asked ({outcome.count} in the queue)"


async def _confirmed(queue: str) -> bool:
    """Ask on the terminal before deleting a whole queue for good."""
    # On stdout, where the answer is typed: input() would send its prompt to stderr.
    print(f"delete every message of {queue} for good? [y/N] ", end="", flush=True)
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


async def _checked(operation: Awaitable[T]) -> T:
    """The operation's result; its errors as the CLI's (an unknown queue is a usage error)."""
    try:
        return await operation
    except dlq.UnknownQueue as exc:
        raise UsageError(str(exc)) from None
    except dlq.DeadLetterError as exc:
        raise CommandFailed(str(exc)) from None


def _report_leftovers(outcome: dlq.Outcome, action: str) -> int:
    """Say on stderr what was asked for and not done; the exit code."""
    if outcome.not_found:
        print(
            f"edrone-bridge dlq {action}: not found: {', '.join(outcome.not_found)}",
            file=sys.stderr,
        )
    if outcome.failure:
        print(
            f"edrone-bridge dlq {action}: stopped: {outcome.failure}; every message not "
            f"reported as replayed is still in {outcome.queue}",
            file=sys.stderr,
        )
    return EXIT_FAILED if outcome.not_found or outcome.failure else 0


# --- rendering -------------------------------------------------------------------------------


def render_listing(listing: dlq.Listing, now: datetime) -> str:
    """A table for people: one row per message, in queue order."""
    lines = [f"{listing.queue}: {_plural(listing.count, 'message')}"]
    if len(listing.messages) < listing.count:
        lines.append(
            f"(listing {len(listing.messages)}: the others were not delivered in time; "
            "another reader may hold them)"
        )
    if not listing.messages:
        return "\n".join(lines)
    rows = [("ID", "ATTEMPTS", "AGE", "ORIGINAL QUEUE", "LAST ERROR")]
    rows += [
        (
            m.id,
            "-" if m.attempts is None else str(m.attempts),
            format_age(m.age_s(now)),
            m.original_queue,
            _one_line(m.error or "-", ERROR_COLUMN_CHARS),
        )
        for m in listing.messages
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1])]
        cells += [row[2].rjust(widths[2]), row[3].ljust(widths[3]), row[4]]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def render_message(message: DeadLetter, now: datetime) -> str:
    """Everything about one message: its failure, properties, headers, and the body (pretty
    JSON when it is JSON)."""
    when = message.dead_lettered_at
    lines = [
        f"id:              {message.id}",
        f"original queue:  {message.original_queue}",
        f"attempts:        {'-' if message.attempts is None else message.attempts}",
        f"age:             {format_age(message.age_s(now))}"
        + (f" (dead-lettered at {when.isoformat()})" if when else ""),
        f"last error:      {message.error or '-'}",
        "properties:",
        *(f"  {name}: {_value(value)}" for name, value in message.properties.items()),
        "headers:",
        *(f"  {name}: {_value(value)}" for name, value in message.headers.items()),
    ]
    body_format, body = decode_body(message.body)
    lines.append(f"body ({body_format}, {_plural(len(message.body), 'byte')}):")
    if body_format == "json":
        lines.append(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        lines.append(body)
    return "\n".join(lines)


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(jsonable(value), ensure_ascii=False)


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
