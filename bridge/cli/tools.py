"""The developer tools of the ``edrone-bridge`` command: ``sign`` and ``simulate`` play edrone's
side of a webhook, ``fake-edrone`` stands in for edrone's trace API."""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator

from bridge import signing
from bridge.cli.common import (
    EXIT_FAILED,
    Subcommands,
    UsageError,
    add_command,
    positive_float,
    positive_int,
    stop_on_signals,
)
from bridge.config import Settings
from bridge.devtools import simulate
from bridge.devtools.fake_edrone import DEFAULT_MAX_RECORDS, Faults, serve

FAKE_EDRONE_PORT = 8081  # beside the ingress's 8080, so both run on one machine


def add_commands(commands: Subcommands) -> None:
    _add_sign(commands)
    _add_simulate(commands)
    _add_fake_edrone(commands)


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


def _add_app_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-id", help="edrone app id (default: the only configured app)")
    parser.add_argument(
        "--secret",
        help="app secret (default: the configured app's current secret; a secret given here "
        "stays in your shell history)",
    )


def _add_sign(commands: Subcommands) -> None:
    parser = add_command(
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


def _add_simulate(commands: Subcommands) -> None:
    parser = add_command(
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
    parser.add_argument("--count", type=positive_int, default=10, help="webhooks to send (10)")
    parser.add_argument(
        "--concurrency", type=positive_int, default=10, help="requests in flight at once (10)"
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=10.0, help="seconds allowed per request (10)"
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


async def run_fake_edrone(settings: Settings, args: argparse.Namespace) -> int:
    try:
        faults = Faults(
            failure_rate=args.failure_rate,
            failure_status=args.failure_status,
            status=args.status,
            latency_ms=args.latency_ms,
            retry_after=args.retry_after,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stopping = stop_on_signals()
    await serve(
        args.host, args.port, stopping, faults, seed=args.seed, max_records=args.max_records
    )
    return 0


def _add_fake_edrone(commands: Subcommands) -> None:
    parser = add_command(
        commands,
        "fake-edrone",
        run_fake_edrone,
        "serve a local stand-in of edrone's trace API (POST /trace) that records every request "
        "(GET /requests) and injects faults, switchable at run time (PUT /faults), until "
        "SIGTERM/SIGINT",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=_port,
        default=FAKE_EDRONE_PORT,
        help=f"listen port ({FAKE_EDRONE_PORT}; 0 picks a free one, logged at start)",
    )
    parser.add_argument(
        "--failure-rate",
        type=float,
        default=0.0,
        help="share of trace requests answered with --failure-status, 0-1 (0)",
    )
    parser.add_argument(
        "--failure-status", type=int, default=500, help="status of those failures (500)"
    )
    parser.add_argument(
        "--status", type=int, help="answer every trace request with this status (default: none)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay added to every trace answer (0)"
    )
    parser.add_argument(
        "--retry-after", type=int, help="Retry-After seconds sent with injected failures"
    )
    parser.add_argument("--seed", type=int, help="seed of the --failure-rate draws")
    parser.add_argument(
        "--max-records",
        type=positive_int,
        default=DEFAULT_MAX_RECORDS,
        help=f"requests kept for GET /requests; older ones are dropped ({DEFAULT_MAX_RECORDS})",
    )


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {value}")
    return value
