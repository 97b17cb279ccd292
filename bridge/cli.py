"""The ``edrone-bridge`` command: parses arguments, loads the settings once, configures logging
and runs one coroutine per subcommand. The only place that installs signal handlers."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any

import asyncpg
import structlog

from bridge import signing, simulate
from bridge.config import ConfigError, Settings, load_settings
from bridge.logs import configure_logging
from bridge.migrate import MigrationError, migrate

log = structlog.get_logger(__name__)

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]
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
        return asyncio.run(command(settings, args))
    except UsageError as exc:
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


async def run_ingress(settings: Settings, args: argparse.Namespace) -> int:
    await ingress_part()(settings, stop_on_signals())
    return 0


async def run_consume_subscriptions(settings: Settings, args: argparse.Namespace) -> int:
    await subscriptions_part()(settings, stop_on_signals())
    return 0


async def run_all(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate, then the ingress and the subscription consumer side by side; each declares the
    topology it needs. A crash in one cancels the other; a part that returns before a stop
    was asked for stops the other gracefully and makes the exit code non-zero."""
    parts = {"ingress": ingress_part(), "consume subscriptions": subscriptions_part()}
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


async def run_sign(settings: Settings, args: argparse.Namespace) -> int:
    app_id, secret = app_and_secret(settings, args.app_id, args.secret)
    fields = {
        "subscription_status_type_id": args.type,
        "email": args.email,
        "phone": args.phone,
        "subscriber_status": args.status,
        "subscription_status_reason": args.reason,
        "event_date": args.event_date,
        "event_id": args.event_id,
    }
    signature = signing.sign(args.version, fields, secret, app_id)
    if not args.show_input:
        print(signature)
        return 0
    parts = simulate.signature_parts(args.version, fields, secret, app_id)
    shown = [
        (name, "<app_secret>" if name == simulate.SECRET_PART else repr(value))
        for name, value in parts
    ]
    print(f"version:   {args.version}")
    print(f"formula:   {simulate.signature_formula(args.version, parts)}")
    print(f"input:     {' . '.join(value for _, value in shown)}")
    print(f"{'token' if args.version == 'LEGACY_UNSUBSCRIBE' else 'signature'}: {signature}")
    return 0


async def run_simulate(settings: Settings, args: argparse.Namespace) -> int:
    app_id, secret = app_and_secret(settings, args.app_id, args.secret)
    if args.channel == "sms" and args.version != "NATIVE_5":
        raise UsageError("--channel sms exists only in NATIVE_5")
    url = args.url or f"http://127.0.0.1:{settings.http_port}{settings.webhook_path}"
    print(
        f"sending {args.count} {args.version} {args.channel} webhooks ({args.format}) "
        f"for app {app_id} to {url}"
    )
    summary = await simulate.send_webhooks(
        url,
        _simulated_bodies(args, app_id, secret),
        body_format=args.format,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
    )
    print(summary.render())
    return 0 if summary.all_accepted else EXIT_FAILED


def _simulated_bodies(
    args: argparse.Namespace, app_id: str, secret: str
) -> Iterator[dict[str, str]]:
    for _ in range(args.count):
        status = random.choice(("0", "1")) if args.status == "random" else args.status
        yield simulate.build_webhook(
            args.version,
            app_id,
            secret,
            channel=args.channel,
            email=args.email,
            phone=args.phone,
            status=status,
        )


# --- helpers ---------------------------------------------------------------------------------


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


def app_and_secret(settings: Settings, app_id: str | None, secret: str | None) -> tuple[str, str]:
    """The app to sign for and its secret: as given, else from the configured apps."""
    if app_id is None:
        if len(settings.apps) != 1:
            configured = ", ".join(sorted(settings.apps)) or "none"
            raise UsageError(f"give --app-id (configured apps: {configured})")
        app_id = next(iter(settings.apps))
    if secret is not None:
        return app_id, secret
    app = settings.apps.get(app_id)
    if app is None:
        raise UsageError(
            f"app {app_id!r} is not configured (EDRONE_BRIDGE_APPS or the TOML file); "
            "configure it or give --secret"
        )
    return app_id, app.secret.get_secret_value()


# --- arguments -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edrone-bridge",
        description="Two-way subscription-status sync between edrone and a shop, over RabbitMQ "
        "and PostgreSQL. Configured by EDRONE_BRIDGE_* environment variables and the TOML file "
        "named by EDRONE_BRIDGE_CONFIG.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add(
        commands,
        "run",
        run_all,
        "migrate, then serve the ingress and the subscription "
        "consumer in one process (until SIGTERM/SIGINT)",
    )
    _add(commands, "ingress", run_ingress, "serve only the webhook ingress (HTTP → RabbitMQ)")
    consume = commands.add_parser(
        "consume", help="run one consumer", description="Run one consumer until SIGTERM/SIGINT."
    )
    consumers = consume.add_subparsers(dest="consumer", required=True, metavar="CONSUMER")
    _add(
        consumers,
        "subscriptions",
        run_consume_subscriptions,
        "apply edrone's status changes to PostgreSQL (RabbitMQ → edrone_bridge.subscribers)",
    )
    _add(commands, "migrate", run_migrate, "apply the pending SQL migrations and print them")
    _add_sign(commands)
    _add_simulate(commands)
    return parser


def _add(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Command,
    summary: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=summary, description=summary[:1].upper() + summary[1:] + "."
    )
    parser.set_defaults(handler=handler)
    return parser


def _add_app_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-id", help="edrone app id (default: the only configured app)")
    parser.add_argument(
        "--secret",
        help="app secret (default: the configured app's current secret; a secret given here "
        "stays in your shell history)",
    )


def _add_sign(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _add(
        commands,
        "sign",
        run_sign,
        "print the signature edrone sends for the given fields, to check a receiver's setup",
    )
    parser.add_argument(
        "--version",
        choices=simulate.VERSIONS,
        default="NATIVE_5",
        help="webhook version (default NATIVE_5; LEGACY_UNSUBSCRIBE prints the token)",
    )
    _add_app_options(parser)
    parser.add_argument("--email", default="", help="e-mail as received")
    parser.add_argument("--phone", default="", help="phone as received (signed for --type 2)")
    parser.add_argument(
        "--type",
        choices=("1", "2"),
        default="1",
        help="subscription_status_type_id: 1 e-mail (default), 2 SMS",
    )
    parser.add_argument("--status", default="", help="subscriber_status: 1, 0 or empty")
    parser.add_argument("--reason", default="", help="subscription_status_reason")
    parser.add_argument("--event-date", default="", help="event_date exactly as received")
    parser.add_argument("--event-id", default="", help="event_id")
    parser.add_argument(
        "--show-input",
        action="store_true",
        help="also show the formula and the concatenated fields, secret masked",
    )


def _add_simulate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _add(
        commands,
        "simulate",
        run_simulate,
        "send signed webhooks to a running "
        "ingress and summarise the answers (exit code 1 unless all got 2xx)",
    )
    parser.add_argument(
        "--url",
        help="webhook URL (default http://127.0.0.1:{http_port}"
        "{webhook_path} from the configuration)",
    )
    parser.add_argument(
        "--version",
        choices=simulate.VERSIONS,
        default="NATIVE_5",
        help="webhook version (default NATIVE_5)",
    )
    parser.add_argument(
        "--channel",
        choices=simulate.CHANNELS,
        default="email",
        help="email (default) or sms (NATIVE_5 only)",
    )
    parser.add_argument(
        "--format",
        choices=simulate.BODY_FORMATS,
        default="json",
        help="body encoding: json (default) or form",
    )
    parser.add_argument("--count", type=_positive_int, default=10, help="webhooks to send (10)")
    parser.add_argument(
        "--concurrency", type=_positive_int, default=10, help="requests in flight at once (10)"
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="seconds allowed per request (10)"
    )
    _add_app_options(parser)
    parser.add_argument("--email", help="one e-mail for every webhook (default: random ones)")
    parser.add_argument("--phone", help="one phone for every SMS webhook (default: random ones)")
    parser.add_argument(
        "--status",
        choices=("1", "0", "", "random"),
        default="random",
        help="subscriber_status to send: 1, 0, '' (unknown) or random (default)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value
