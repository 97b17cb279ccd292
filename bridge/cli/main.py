"""The ``edrone-bridge`` command: parses arguments, loads the settings once, configures logging
and runs one coroutine per subcommand. The command modules beside it add their subcommands:
``processes`` (run, ingress, consume, relay, migrate), ``status``, ``dlq``, ``history``,
``prune``, ``reconcile``, ``backfill`` and ``tools`` (the developer tools)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import structlog

from bridge import bridge_version
from bridge.cli import backfill, dlq, history, processes, prune, reconcile, status, tools
from bridge.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OPERATIONAL_ERRORS,
    Command,
    CommandFailed,
    UsageError,
    event_loop_factory,
)
from bridge.config import ConfigError, load_settings
from bridge.logs import configure_logging

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"edrone-bridge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings)
    command: Command = args.handler
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(command(settings, args))
    except UsageError as exc:
        print(f"edrone-bridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as exc:
        print(f"edrone-bridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as exc:
        # Found at start, say a shop target that does not fit its table: one line.
        print(f"edrone-bridge {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_INTERRUPTED
    except OPERATIONAL_ERRORS as exc:
        log.error("command_failed", command=_named(args), error=str(exc) or repr(exc))
        return EXIT_FAILED
    except Exception:
        log.exception("command_failed", command=_named(args))
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edrone-bridge",
        description="Two-way subscription-status sync between edrone and a shop, over RabbitMQ "
        "and PostgreSQL. Configured by EDRONE_BRIDGE_* environment variables and the TOML file "
        "named by EDRONE_BRIDGE_CONFIG.",
    )
    parser.add_argument("--version", action="version", version=f"edrone-bridge {bridge_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    processes.add_commands(commands)
    dlq.add_commands(commands)
    status.add_commands(commands)
    history.add_commands(commands)
    prune.add_commands(commands)
    reconcile.add_commands(commands)
    backfill.add_commands(commands)
    tools.add_commands(commands)
    return parser


def _named(args: argparse.Namespace) -> str:
    """The command as typed: ``consume traces``, ``dlq replay``, ``migrate``."""
    return " ".join(
        filter(None, (args.command, getattr(args, "consumer", None), getattr(args, "action", None)))
    )
