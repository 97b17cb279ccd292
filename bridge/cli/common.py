"""What every command module of the CLI shares: exit codes, the errors a command raises,
the argument types, signal handling and the event loop."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias

import asyncpg
import structlog

from bridge.config import Settings
from bridge.migrate import MigrationError

log = structlog.get_logger(__name__)

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
EXIT_FAILED = 1
EXIT_USAGE = 2  # also argparse's: the command line or the configuration is wrong
EXIT_DRIFT = 3  # `reconcile` found addresses where the sides differ
EXIT_INTERRUPTED = 130
# Failures an operator fixes outside the code (a service down, a changed migration): one
# readable line is more use than a traceback.
OPERATIONAL_ERRORS = (OSError, TimeoutError, MigrationError, asyncpg.PostgresError)


class UsageError(Exception):
    """Arguments that cannot work together with the configuration (say, an unknown app)."""


class CommandFailed(Exception):
    """A command that could not do its job for a reason it states (exit code 1)."""


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (the ``speed`` extra), else asyncio's own: measured
    with benchmarks/, it takes about a tenth off the ingress's CPU per webhook."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def stop_on_signals(grace_s: float | None = None) -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT, so the parts drain and stop; a second one
    cancels the command outright, for when a drain hangs, and so does the end of ``grace_s``
    after the first: whatever state the command is in, it ends within its grace period."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def force(why: str) -> None:
        if main_task is not None and not main_task.done():
            log.warning("stop_forced", reason=why)
            main_task.cancel()

    def on_signal(received: signal.Signals) -> None:
        if stopping.is_set():
            force(f"second {received.name}")
            return
        log.info("stop_requested", signal=received.name)
        stopping.set()
        if grace_s is not None:
            loop.call_later(grace_s, force, f"still running {grace_s:g} s after {received.name}")

    for received in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(received, on_signal, received)
    return stopping


def grace_period_s(settings: Settings) -> float:
    """How long a stop may take: the longest drain of any part, and a little for closing."""
    drains = (settings.subscriptions.drain_timeout_s, settings.traces.drain_timeout_s)
    return max(settings.shutdown_timeout_s, *drains) + 2.0


def require_apps(settings: Settings) -> None:
    """The commands that serve need an app: without one every webhook would be refused and
    every shop event dead-lettered."""
    if not settings.apps:
        raise UsageError(
            "no app is configured: set EDRONE_BRIDGE_APPS=app_id:app_secret "
            "(or an [apps.<app_id>] table in the file named by EDRONE_BRIDGE_CONFIG)"
        )


def add_command(
    commands: Subcommands,
    name: str,
    handler: Command,
    summary: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=summary, description=summary[:1].upper() + summary[1:] + "."
    )
    parser.set_defaults(handler=handler)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def format_age(seconds: float | None) -> str:
    """``42s``, ``12m05s``, ``3h05m``, ``2d04h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86_400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86_400}d{whole % 86_400 // 3600:02d}h"
