"""The ``status`` command: a table for people or JSON for machines, exit 1 when unhealthy. Glue
only: the checks are in ``bridge.ops.status``."""

from __future__ import annotations

import argparse
import json

from bridge.cli.common import (
    EXIT_FAILED,
    Subcommands,
    UsageError,
    add_command,
    format_age,
    positive_float,
)
from bridge.config import Settings
from bridge.ops import queue_status, status
from bridge.service_urls import amqp_urls

COLUMNS = ("QUEUE", "KIND", "READY", "UNACKED", "CONSUMERS", "OLDEST", "REPLICAS", "LEADER")


def add_commands(commands: Subcommands) -> None:
    parser = add_command(
        commands,
        "status",
        run_status,
        "show every queue's ready and unacked counts, consumers and oldest message age, and "
        "whether the database answers and is migrated; exit 1 when something is unhealthy",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document, for machines")
    parser.add_argument(
        "--max-dlq",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="dead-lettered messages a dead-letter queue may hold and still be healthy (0)",
    )
    parser.add_argument(
        "--max-age-s",
        type=positive_float,
        default=status.DEFAULT_MAX_AGE_S,
        metavar="SECONDS",
        help="oldest message age a work queue may reach; a retry tier may also wait out its "
        f"own and the shorter tiers' delays ({status.DEFAULT_MAX_AGE_S:g})",
    )
    parser.add_argument(
        "--management-url",
        metavar="URL",
        help="the RabbitMQ management API (default: the broker's host, port 15672, the AMQP "
        "login); when it does not answer, counts come from AMQP and unacked is unknown",
    )
    parser.add_argument(
        "--timeout-s",
        type=positive_float,
        default=status.DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"bound of every wait on RabbitMQ, its API and PostgreSQL "
        f"({status.DEFAULT_TIMEOUT_S:g})",
    )


async def run_status(settings: Settings, args: argparse.Namespace) -> int:
    try:
        management = None
        if args.management_url is not None:
            first = amqp_urls(settings.amqp_url.get_secret_value())[0]
            management = queue_status.management_for(first, args.management_url)
    except ValueError as exc:
        raise UsageError(f"--management-url: {exc}") from None
    result = await status.check_status(
        settings,
        management=management,
        limits=status.Limits(max_dlq=args.max_dlq, max_age_s=args.max_age_s),
        timeout_s=args.timeout_s,
    )
    if args.json:
        print(json.dumps(status.to_json(result), indent=2, ensure_ascii=False))
    else:
        print(render(result))
    return 0 if result.healthy else EXIT_FAILED


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


# --- rendering -------------------------------------------------------------------------------


def render(result: status.Status) -> str:
    """The table for people: a verdict, the services, one row per queue, then the why."""
    count = len(result.problems)
    verdict = f"UNHEALTHY ({count} problem{'' if count == 1 else 's'})"
    verdict = "healthy" if result.healthy else verdict
    lines = [
        f"edrone-bridge status: {verdict}",
        f"broker:   {_broker_line(result.broker)}",
        f"database: {_database_line(result.database)}",
        "",
        *_queue_table(result),
    ]
    if result.problems:
        lines += ["", "unhealthy:"]
        lines += [f"  {p.subject}: {p.reason}" for p in result.problems]
    if result.notes:
        lines += ["", "notes:"]
        lines += [f"  {note}" for note in result.notes]
    return "\n".join(lines)


def _broker_line(broker: queue_status.BrokerStatus) -> str:
    where = f"{broker.url} (vhost {broker.vhost})"
    if not broker.reachable:
        return f"{where} UNREACHABLE: {broker.error}"
    if broker.management_error is None:
        return f"{where}, counts from the management API at {broker.management_url}"
    return f"{where}, counts over AMQP (management API at {broker.management_url} unavailable)"


def _database_line(database: status.DatabaseStatus) -> str:
    where = f"{database.url}, schema {database.schema}"
    if not database.reachable:
        return f"{where} UNREACHABLE: {database.error}"
    answered = f"answered in {database.response_ms or 0:.0f} ms"
    total = len(database.applied) + len(database.pending) + len(database.changed)
    migrations = f"{len(database.applied)} of {total} migrations applied"
    if database.pending:
        migrations += f", {len(database.pending)} PENDING"
    return f"{where}: {answered}; {migrations}"


def _queue_table(result: status.Status) -> list[str]:
    flagged: dict[str, list[str]] = {}
    for problem in result.problems:
        flagged.setdefault(problem.subject, []).append(problem.code.replace("_", " "))
    rows = [COLUMNS] + [_queue_cells(queue) for queue in result.queues]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row, name in zip(rows, ["", *(q.name for q in result.queues)], strict=True):
        # Names left, numbers right, the leader's node name left again.
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:-1], widths[2:-1], strict=True)]
        cells.append(row[-1].ljust(widths[-1]))
        line = "  ".join(cells)
        if name not in flagged:
            line = line.rstrip()
        if name in flagged:
            # The row an operator must act on stands out at the end of the line.
            line += "  << " + ", ".join(flagged[name]).upper()
        lines.append(line)
    return lines


def _queue_cells(queue: queue_status.QueueStatus) -> tuple[str, ...]:
    if queue.exists is False:
        return (queue.name, queue.kind, "-", "-", "-", "-", "-", "-")
    counts = (queue.ready, queue.unacked, queue.consumers)
    return (
        queue.name,
        queue.kind,
        *("?" if n is None else str(n) for n in counts),
        _age(queue),
        *_replicas(queue),
    )


def _replicas(queue: queue_status.QueueStatus) -> tuple[str, str]:
    """Online of all members, and the leader: "?" where the management API did not say."""
    if queue.members is None:
        return "?", "?"
    return f"{len(queue.members) - len(queue.offline)}/{len(queue.members)}", queue.leader or "?"


def _age(queue: queue_status.QueueStatus) -> str:
    if queue.oldest_age_s is not None:
        return format_age(queue.oldest_age_s)
    # "-": nothing waits; "?": something waits, but its age is not known.
    return "-" if queue.messages == 0 else "?"
