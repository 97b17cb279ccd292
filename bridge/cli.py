"""The ``edrone-bridge`` command: parses arguments, loads the settings once, configures logging
and runs one coroutine per subcommand. The only place that installs signal handlers; the
developer tools live in ``cli_tools`` and the dead-letter commands in ``cli_dlq``."""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeAlias

import asyncpg
import structlog

from bridge.config import ConfigError, Settings, load_settings
from bridge.logs import configure_logging
from bridge.migrate import MigrationError, migrate

log = structlog.get_logger(__name__)

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# A long-running part of the bridge: serves until the event is set, then drains and returns.
Part = Callable[[Settings, asyncio.Event], Awaitable[None]]

EXIT_FAILED = 1
EXIT_USAGE = 2  # also argparse's: the command line or the configuration is wrong
EXIT_INTERRUPTED = 130
# Failures an operator fixes outside the code (a service down, a changed migration): one
# readable line is more use than a traceback.
OPERATIONAL_ERRORS = (OSError, TimeoutError, MigrationError, asyncpg.PostgresError)


class UsageError(Exception):
    """Arguments that cannot work together with the configuration (say, an unknown app)."""


class CommandFailed(Exception):
    """A command that could not do its job for a reason it states (exit code 1)."""


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
        log.error("command_failed", command=args.command, error=str(exc) or repr(exc))
        return EXIT_FAILED
    except Exception:
        log.exception("command_failed", command=args.command)
        return EXIT_FAILED


# --- commands --------------------------------------------------------------------------------


async def run_migrate(settings: Settings, args: argparse.Namespace) -> int:
    applied = await apply_migrations(settings)
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print(f"schema {settings.database_schema} is up to date")
    return 0


async def apply_migrations(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        return await migrate(conn, settings.database_schema)
    finally:
        await conn.close()


# The parts are imported only by the commands that run them, so that `sign`, `migrate` and
# `--help` work without them.
def ingress_part() -> Part:
    from bridge.ingress.app import serve

    return serve


def subscriptions_part() -> Part:
    from consumers.subscriptions import serve

    return serve


def traces_part() -> Part:
    from consumers.traces import serve

    return serve


async def run_ingress(settings: Settings, args: argparse.Namespace) -> int:
    stopping = stop_on_signals()
    if args.worker or settings.ingress_workers == 1:
        from bridge.ingress.app import serve

        await serve(settings, stopping, reuse_port=args.worker)
        return 0
    if settings.http_port == 0:
        raise UsageError("ingress_workers above 1 needs a fixed http_port (0 picks one each)")
    return await serve_ingress_workers(settings, stopping)


async def serve_ingress_workers(settings: Settings, stopping: asyncio.Event) -> int:
    """Serve as one of ``ingress_workers`` processes on one port; the others are ``ingress
    --worker`` children (same environment, so the same settings). A stop reaches them all; a
    worker that exits unasked stops the rest, and the exit code is then 1."""
    workers = [
        await asyncio.create_subprocess_exec(sys.executable, "-m", "bridge", "ingress", "--worker")
        for _ in range(settings.ingress_workers - 1)
    ]
    log.info("ingress_workers_started", pids=[worker.pid for worker in workers])
    failed: list[int] = []

    async def watch(worker: asyncio.subprocess.Process) -> None:
        code = await worker.wait()
        if not stopping.is_set():
            log.error("ingress_worker_exited", pid=worker.pid, code=code)
            failed.append(worker.pid)
            stopping.set()

    async def relay_stop() -> None:
        await stopping.wait()
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)

    watchers = [asyncio.create_task(watch(worker)) for worker in workers]
    relay = asyncio.create_task(relay_stop())
    from bridge.ingress.app import serve

    try:
        await serve(settings, stopping, reuse_port=True)
    finally:
        stopping.set()
        await relay
        # The workers drain within the same shutdown timeout as this process.
        await asyncio.wait(watchers, timeout=settings.shutdown_timeout_s + 5.0)
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
        await asyncio.gather(*watchers, return_exceptions=True)
    return EXIT_FAILED if failed else 0


async def run_consume_subscriptions(settings: Settings, args: argparse.Namespace) -> int:
    await subscriptions_part()(settings, stop_on_signals())
    return 0


async def run_consume_traces(settings: Settings, args: argparse.Namespace) -> int:
    await traces_part()(settings, stop_on_signals())
    return 0


async def run_relay(settings: Settings, args: argparse.Namespace) -> int:
    from bridge.relay import serve

    await serve(settings, stop_on_signals())
    return 0


async def run_all(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate, then the ingress and both consumers side by side; each declares the topology it
    needs. A crash in one cancels the others; a part that returns before a stop was asked for
    stops the others gracefully and makes the exit code non-zero."""
    from bridge.metrics import Metrics

    # One registry for the process, exposed on the ingress's /metrics.
    metrics = Metrics()
    consume_subscriptions, consume_traces = subscriptions_part(), traces_part()
    parts: dict[str, Part] = {
        "ingress": functools.partial(ingress_part(), metrics=metrics),
        "consume subscriptions": functools.partial(
            consume_subscriptions, metrics=metrics, expose_metrics=False
        ),
        "consume traces": functools.partial(consume_traces, metrics=metrics, expose_metrics=False),
    }
    await apply_migrations(settings)
    stopping = stop_on_signals()
    failed: list[str] = []

    async def supervise(name: str, serve: Part) -> None:
        await serve(settings, stopping)
        if not stopping.is_set():
            log.error("part_exited", part=name)
            failed.append(name)
            stopping.set()

    try:
        async with asyncio.TaskGroup() as group:
            for name, serve in parts.items():
                group.create_task(supervise(name, serve), name=name)
    except ExceptionGroup as crashed:
        # Usually one part crashed and the other was cancelled: report that one error plainly.
        if len(crashed.exceptions) == 1:
            raise crashed.exceptions[0] from None
        raise
    return EXIT_FAILED if failed else 0


# --- helpers ---------------------------------------------------------------------------------


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (the ``speed`` extra), else asyncio's own: measured
    with benchmarks/, it takes about a tenth off the ingress's CPU per webhook."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def stop_on_signals() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT, so the parts drain and stop; a second one
    cancels the command outright, for when a drain hangs."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal(received: signal.Signals) -> None:
        if stopping.is_set() and main_task is not None:
            log.warning("stop_forced", signal=received.name)
            main_task.cancel()
            return
        log.info("stop_requested", signal=received.name)
        stopping.set()

    for received in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(received, on_signal, received)
    return stopping


# --- arguments -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edrone-bridge",
        description="Two-way subscription-status sync between edrone and a shop, over RabbitMQ "
        "and PostgreSQL. Configured by EDRONE_BRIDGE_* environment variables and the TOML file "
        "named by EDRONE_BRIDGE_CONFIG.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_command(
        commands,
        "run",
        run_all,
        "migrate, then serve the ingress and both consumers in one process (until SIGTERM/SIGINT)",
    )
    ingress = add_command(
        commands, "ingress", run_ingress, "serve only the webhook ingress (HTTP → RabbitMQ)"
    )
    # Set by the first process for the others when ingress_workers is above 1.
    ingress.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    consume = commands.add_parser(
        "consume", help="run one consumer", description="Run one consumer until SIGTERM/SIGINT."
    )
    consumers = consume.add_subparsers(dest="consumer", required=True, metavar="CONSUMER")
    add_command(
        consumers,
        "subscriptions",
        run_consume_subscriptions,
        "apply edrone's status changes to PostgreSQL (RabbitMQ → edrone_bridge.subscribers)",
    )
    add_command(
        consumers,
        "traces",
        run_consume_traces,
        "forward the shop's subscription changes to edrone's trace API (RabbitMQ → edrone)",
    )
    add_command(commands, "migrate", run_migrate, "apply the pending SQL migrations and print them")
    add_command(
        commands,
        "relay",
        run_relay,
        "install the outbox trigger on each app's target table, then publish the shop's changes "
        "it records as platform events (PostgreSQL outbox → RabbitMQ), until SIGTERM/SIGINT",
    )
    # Imported here, not at the top: both modules build on this one.
    from bridge import cli_dlq, cli_history, cli_status, cli_tools

    cli_dlq.add_commands(commands)
    cli_status.add_commands(commands)
    cli_history.add_commands(commands)
    cli_tools.add_commands(commands)
    return parser


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
