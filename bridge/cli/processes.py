"""The long-running commands and ``migrate``: each process of the bridge is assembled here,
from the parts (ingress, consumers, relay), which know nothing of one another."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import structlog

from bridge.cli.common import (
    EXIT_FAILED,
    Subcommands,
    UsageError,
    add_command,
    grace_period_s,
    require_apps,
    stop_on_signals,
)
from bridge.config import Settings
from bridge.db import CONNECT_ERRORS, close_pool, create_pool, unreachable
from bridge.migrate import migrate
from bridge.starting import Stopped, unless_stopped

if TYPE_CHECKING:
    from bridge.metrics import Metrics
    from consumers.service import ConsumerPart

log = structlog.get_logger(__name__)

# A long-running part of the bridge: serves until the event is set, then drains and returns.
Part = Callable[[Settings, asyncio.Event], Awaitable[None]]


def add_commands(commands: Subcommands) -> None:
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
    traces = add_command(
        consumers,
        "traces",
        run_consume_traces,
        "forward the shop's subscription changes to edrone's trace API (RabbitMQ → edrone)",
    )
    traces.add_argument(
        "--lane",
        choices=("both", "live", "background"),
        help="consume only the shop's changes (live) or only the rows of backfill and reconcile "
        "(background), each in a process of its own; default: traces.lane (both)",
    )
    add_command(commands, "migrate", run_migrate, "apply the pending SQL migrations and print them")
    add_command(
        commands,
        "relay",
        run_relay,
        "install the outbox trigger on each app's target table, then publish the shop's changes "
        "it records as platform events (PostgreSQL outbox → RabbitMQ), until SIGTERM/SIGINT",
    )


async def run_migrate(settings: Settings, args: argparse.Namespace) -> int:
    applied = await apply_migrations(settings)
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print(f"schema {settings.database_schema} is up to date")
    return 0


async def apply_migrations(settings: Settings, stopping: asyncio.Event | None = None) -> list[str]:
    url = settings.database_url.get_secret_value()
    try:
        conn = await unless_stopped(asyncpg.connect(url, timeout=10), stopping)
    except CONNECT_ERRORS as exc:
        raise unreachable(url, exc) from exc
    try:
        return await migrate(conn, settings.database_schema)
    finally:
        await conn.close()


# The parts are imported only by the commands that run them, so that `sign`, `migrate` and
# `--help` work without them.
def ingress_part() -> Part:
    from bridge.ingress.app import serve

    return serve


def subscriptions_part(metrics: Metrics | None = None, *, expose_metrics: bool = True) -> Part:
    from consumers.subscriptions import PART

    return with_retention(_served(PART, metrics, expose_metrics))


def traces_part(metrics: Metrics | None = None, *, expose_metrics: bool = True) -> Part:
    from bridge.metrics import Metrics
    from consumers.traces import PART

    # One registry for the forwarder and the drift check beside it.
    metrics = metrics if metrics is not None else Metrics()
    return with_drift_check(_served(PART, metrics, expose_metrics), metrics)


# A job run beside a part on a pool of its own, until the part's stopping is set.
Job = Callable[[asyncpg.Pool, Settings, asyncio.Event], Awaitable[None]]


def _beside(part: Part, job: Job, name: str, *, command_timeout_s: float) -> Part:
    """``part``, and beside it, while it runs, ``job`` on a small pool of its own."""

    async def serve(settings: Settings, stopping: asyncio.Event) -> None:
        try:
            pool = await create_pool(
                settings, command_timeout_s=command_timeout_s, max_size=2, stopping=stopping
            )
        except Stopped:
            return
        task = asyncio.create_task(job(pool, settings, stopping), name=name)
        try:
            await part(settings, stopping)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await close_pool(pool, 5.0)

    return serve


def with_drift_check(part: Part, metrics: Metrics) -> Part:
    """``part``, and beside it, while it runs, the drift check of EDRONE_BRIDGE_DRIFT_INTERVAL_S
    (if set) on a small pool of its own, counted into ``metrics``."""

    async def check(pool: asyncpg.Pool, settings: Settings, stopping: asyncio.Event) -> None:
        from bridge.ops.drift_check import check_on_schedule

        await check_on_schedule(pool, settings, metrics, stopping=stopping)

    checked = _beside(part, check, "drift check", command_timeout_s=600.0)

    async def serve(settings: Settings, stopping: asyncio.Event) -> None:
        await (part if settings.drift_interval_s is None else checked)(settings, stopping)

    return serve


def with_retention(part: Part) -> Part:
    """``part``, and beside it, while it runs, the scheduled prune of EDRONE_BRIDGE_RETENTION_DAYS
    (if set) on a small pool of its own."""

    async def prune(pool: asyncpg.Pool, settings: Settings, stopping: asyncio.Event) -> None:
        from bridge.ops.prune import prune_on_schedule

        assert settings.retention_days is not None
        await prune_on_schedule(
            pool,
            timedelta(days=settings.retention_days),
            interval_s=settings.retention_interval_s,
            stopping=stopping,
            schema=settings.database_schema,
        )

    pruned = _beside(part, prune, "scheduled prune", command_timeout_s=60.0)

    async def serve(settings: Settings, stopping: asyncio.Event) -> None:
        await (part if settings.retention_days is None else pruned)(settings, stopping)

    return serve


def _served(part: ConsumerPart, metrics: Metrics | None, expose_metrics: bool) -> Part:
    """A consumer module's part, run by the one serve every consumer shares."""
    from consumers.service import serve

    return functools.partial(serve, part, metrics=metrics, expose_metrics=expose_metrics)


async def run_ingress(settings: Settings, args: argparse.Namespace) -> int:
    require_apps(settings)
    stopping = stop_on_signals(grace_period_s(settings))
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
    require_apps(settings)
    await subscriptions_part()(settings, stop_on_signals(grace_period_s(settings)))
    return 0


async def run_consume_traces(settings: Settings, args: argparse.Namespace) -> int:
    require_apps(settings)
    if args.lane is not None:
        traces = settings.traces.model_copy(update={"lane": args.lane})
        settings = settings.model_copy(update={"traces": traces})
    if settings.traces.lane == "background" and settings.traces.background_nice:
        # Below live traffic for the machine's CPU; the rate limits are shared all the same.
        os.nice(settings.traces.background_nice)
    await traces_part()(settings, stop_on_signals(grace_period_s(settings)))
    return 0


async def run_relay(settings: Settings, args: argparse.Namespace) -> int:
    from bridge.relay import serve

    require_apps(settings)
    await serve(settings, stop_on_signals(grace_period_s(settings)))
    return 0


async def run_all(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate, then the ingress and both consumers side by side; each declares the topology it
    needs. A crash in one cancels the others; a part that returns before a stop was asked for
    stops the others gracefully and makes the exit code non-zero."""
    from bridge.metrics import Metrics

    require_apps(settings)
    # One registry for the process, exposed on the ingress's /metrics.
    metrics = Metrics()
    parts: dict[str, Part] = {
        "ingress": functools.partial(ingress_part(), metrics=metrics),
        "consume subscriptions": subscriptions_part(metrics, expose_metrics=False),
        "consume traces": traces_part(metrics, expose_metrics=False),
    }
    stopping = stop_on_signals(grace_period_s(settings))
    try:
        await apply_migrations(settings, stopping)
    except Stopped:
        log.info("stopped_before_serving", part="migrate")
        return 0
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
