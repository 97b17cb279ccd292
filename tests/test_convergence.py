"""Two-way convergence, model-based, against the real services (docs/design.md promise 6): random
timelines of people changing statuses on both sides of thousands of addresses, a simulated
edrone that answers traces as edrone does (webhooks back with TRACE reasons and its own date,
delayed, reordered, some twice, dated to the second or the millisecond), the real ingress,
consumers and outbox relay as their own processes, and three shops: a mapped table with the
relay, and two that publish their own changes and echo the bridge's (with and without
``caused_by``). After quiescence, every address must hold the same status on both sides, and
that status must be the newest change a person made.

``EDRONE_BRIDGE_MODEL_ADDRESSES`` sets the addresses per shop (2,000), and
``EDRONE_BRIDGE_MODEL_SEED`` replays a run (the seed is printed); see docs/testing.md."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from bridge.amqp import topology
from bridge.db import create_pool
from bridge.ops.history import read_history, render
from tests.convergence.edrone import EdroneAccount, SimulatedEdrone
from tests.convergence.model import (
    EDRONE,
    INITIAL,
    Made,
    Timeline,
    acceptable,
    mark_doubtful,
    mark_late,
    mark_swapped,
    timelines,
)
from tests.convergence.shop import TARGET, BusShop, TableShop
from tests.support.processes import BridgeProcess, bridge_env, free_port, wait_ready

ADDRESSES = int(os.environ.get("EDRONE_BRIDGE_MODEL_ADDRESSES", "2000"))
SEED = int(os.environ.get("EDRONE_BRIDGE_MODEL_SEED", str(random.SystemRandom().randrange(10**6))))
# Timelines: gaps from tens of milliseconds to tens of seconds; starts spread over 30 s per
# 2,000 addresses, so that more addresses make a longer run at the same rate, not a heavier one
# (one test process plays edrone and three shops on the same two cores as the bridge).
MIN_GAP_S, MAX_GAP_S = 0.02, 20.0
SPREAD_S = 30.0 * max(1.0, ADDRESSES / 2000)
# The simulated shops apply the bridge's events within tens of milliseconds.
ECHO_LATENCY_S = 1.0
QUIET_S = 4.0  # nothing moving for this long, every queue and outbox empty: quiescent
MODES = {"table": "tbl-app", "bus-caused-by": "buscb-app", "bus": "bus-app"}
SECRETS = {app: f"{app}-secret" for app in MODES.values()}


@dataclass
class Run:
    settings: object
    edrone: SimulatedEdrone
    shops: dict[str, TableShop | BusShop]
    lines: dict[str, list[Timeline]]


def config_file(tmp_path: Path) -> Path:
    """The three apps: one with the mapped table, two that publish edrone's changes (one of
    whose shops names the cause of every echo)."""
    apps: dict[str, dict[str, object]] = {
        MODES["table"]: {"secret": SECRETS[MODES["table"]]},
        MODES["bus-caused-by"]: {
            "secret": SECRETS[MODES["bus-caused-by"]],
            "publish_changes": True,
            "shop_names_causes": True,
        },
        MODES["bus"]: {"secret": SECRETS[MODES["bus"]], "publish_changes": True},
    }
    lines = []
    for app_id, options in apps.items():
        lines += [f"[apps.{app_id}]", *(f"{k} = {toml(v)}" for k, v in options.items())]
    lines += [f"[apps.{MODES['table']}.target]", *(f"{k} = {toml(v)}" for k, v in TARGET.items())]
    path = tmp_path / "bridge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def bridge_environment(settings, tmp_path: Path, trace_url: str, port: int) -> dict[str, str]:
    env = bridge_env(
        settings,
        EDRONE_BRIDGE_CONFIG=str(config_file(tmp_path)),
        EDRONE_BRIDGE_TRACE_URL=trace_url,
        EDRONE_BRIDGE_HTTP_PORT=str(port),
        EDRONE_BRIDGE_TRACES__RATE_LIMIT_PER_S="0",
        EDRONE_BRIDGE_TRACES__CONCURRENCY="50",
        EDRONE_BRIDGE_TRACES__RETRY_TIERS_S="[0.5, 2.0, 5.0]",
        EDRONE_BRIDGE_TRACES__FLUSH_INTERVAL_MS="10",
        EDRONE_BRIDGE_SUBSCRIPTIONS__FLUSH_INTERVAL_MS="10",
        EDRONE_BRIDGE_RELAY__POLL_INTERVAL_S="1",
        EDRONE_BRIDGE_SYNC__DISPATCH_POLL_INTERVAL_S="0.5",
        EDRONE_BRIDGE_SYNC__ECHO_LATENCY_S=str(ECHO_LATENCY_S),
        EDRONE_BRIDGE_LOG_LEVEL="warning",
    )
    env.pop("EDRONE_BRIDGE_APPS")  # every app is in the TOML file
    return env


async def drive(line: Timeline, run: Run, started: float) -> None:
    """Make the timeline's changes at their times on their sides, recording what was made."""
    app_id = MODES[line.mode]
    for change in line.planned:
        await asyncio.sleep(max(0.0, started + line.start_s + change.after_s - time.monotonic()))
        if change.side == EDRONE:
            made = run.edrone.person_sets(app_id, line.email, change.status)
            if made is not None:
                line.made.append(Made(EDRONE, change.status, made[0], made[1]))
        else:
            at = await run.shops[line.mode].person_sets(line.email, change.status)
            if at is not None:
                line.made.append(Made("shop", change.status, at))


async def quiescent(
    run: Run, amqp: aio_pika.abc.AbstractConnection, db: asyncpg.Connection, since: float
) -> bool:
    """Every queue and outbox empty, no webhook on its way, and nothing moved (a trace, a
    webhook taken, a bridge event applied) for QUIET_S, counted from ``since`` at the earliest
    (when the last change was made)."""
    names = topology(run.settings)
    queues = [names.subscriptions_queue, names.traces_queue, *names.retry_queues((0.5, 2.0, 5.0))]
    channel = await amqp.channel()
    async with channel:
        for queue in queues:
            declared = await channel.declare_queue(queue, passive=True)
            if declared.declaration_result.message_count:
                return False
    if await db.fetchval("SELECT count(*) FROM dispatch WHERE sent_at IS NULL"):
        return False
    if await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"):
        return False
    if run.edrone.pending:
        return False
    moved = max(
        since,
        run.edrone.last_activity,
        *(shop.last_activity for shop in run.shops.values() if isinstance(shop, BusShop)),
    )
    return time.monotonic() - moved > QUIET_S


@pytest.mark.timeout(1800)
async def test_both_sides_converge_on_the_newest_change_a_person_made(
    make_settings, amqp_connection, db, tmp_path, measured
):
    """For every address of every shop mode, after quiescence: shop == edrone == the newest
    change a person made (at the sources' resolution: ties fall to the order the bridge
    learned them). Counts per mode are printed; a failing address's timeline, what edrone and
    the shop saw, and the bridge's history of it are shown."""
    rng = random.Random(SEED)
    measured(f"[convergence] seed {SEED}, {ADDRESSES} addresses per mode")
    settings = make_settings()
    port = free_port()
    lines = {
        mode: timelines(
            rng, mode, ADDRESSES, spread_s=SPREAD_S, min_gap_s=MIN_GAP_S, max_gap_s=MAX_GAP_S
        )
        for mode in MODES
    }
    accounts = {app: EdroneAccount(app, SECRETS[app]) for app in MODES.values()}
    pool = await create_pool(settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s)
    channel = await amqp_connection.channel(publisher_confirms=True)
    # The shops publish on a channel of their own, apart from the one they consume on.
    publishing = await amqp_connection.channel(publisher_confirms=True)
    ingress = f"http://127.0.0.1:{port}{settings.webhook_path}"
    async with SimulatedEdrone(accounts, ingress, random.Random(rng.random())) as edrone:
        table = TableShop(pool, MODES["table"])
        await table.create([line.email for line in lines["table"]])
        env = bridge_environment(settings, tmp_path, edrone.url, port)
        bridge = BridgeProcess(tmp_path / "run.log", "run", env=env)
        relay = BridgeProcess(tmp_path / "relay.log", "relay", env=env)
        try:
            await bridge.start()
            await wait_ready(f"http://127.0.0.1:{port}", 60)
            await relay.start()
            exchange = await channel.declare_exchange(
                settings.platform_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            shop_exchange = await publishing.get_exchange(settings.platform_exchange)
            shops: dict[str, TableShop | BusShop] = {"table": table}
            for mode in ("bus-caused-by", "bus"):
                shops[mode] = BusShop(
                    MODES[mode],
                    [line.email for line in lines[mode]],
                    caused_by=mode == "bus-caused-by",
                    exchange=shop_exchange,
                    routing_key=settings.platform_routing_key,
                )
            listen = await channel.declare_queue(exclusive=True, auto_delete=True)
            await listen.bind(exchange, routing_key=settings.changes_routing_key)
            bus_shops = {shop.app_id: shop for shop in shops.values() if isinstance(shop, BusShop)}

            async def on_change(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    app_id = json.loads(message.body)["app_id"]
                    if app_id in bus_shops:
                        await bus_shops[app_id].apply(message)

            await listen.consume(on_change)
            # The relay installs its trigger at start: changes before it would be unseen.
            await wait_for_trigger(db)
            run = Run(settings, edrone, shops, lines)
            started = time.monotonic()
            await asyncio.gather(
                *(drive(line, run, started) for mode in lines for line in lines[mode])
            )
            driven = time.monotonic()
            driven_s = driven - started
            async with asyncio.timeout(600):
                while not await quiescent(run, amqp_connection, db, driven):  # noqa: ASYNC110
                    await asyncio.sleep(0.5)
            settled_s = time.monotonic() - started - driven_s
            results = await judge(run, db, measured, driven_s, settled_s)
        finally:
            await relay.terminate(30)
            await bridge.terminate(30)
            await channel.close()
            await publishing.close()
            await pool.close()
    for mode, counts in results.items():
        assert counts["divergent"] == 0, (mode, counts)
        assert counts["wrong_winner"] == 0, (mode, counts)


async def wait_for_trigger(db: asyncpg.Connection) -> None:
    async with asyncio.timeout(60):
        while not await db.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%outbox%'"
        ):
            await asyncio.sleep(0.1)


async def judge(
    run: Run, db, measured, driven_s: float, settled_s: float
) -> dict[str, Counter[str]]:
    results = {}
    shown = 0
    for mode, lines in run.lines.items():
        app_id = MODES[mode]
        shop_status = await run.shops[mode].statuses()
        edrone_status = run.edrone.accounts[app_id].status
        counts: Counter[str] = Counter(addresses=len(lines))
        for line in lines:
            counts["changes"] += len(line.made)
            shop_side = run.shops[mode]
            if isinstance(shop_side, BusShop) and not shop_side.caused_by:
                mark_doubtful(line.made, shop_side.unechoed[line.email], ECHO_LATENCY_S)
                mark_swapped(line.made, shop_side.echoed[line.email], ECHO_LATENCY_S)
                counts["late_echoes"] += mark_late(
                    line.made, shop_side.echoed[line.email], ECHO_LATENCY_S
                )
            doubtful = any(c.doubtful or c.swapped is not None for c in line.made)
            want = acceptable(line.made) or {INITIAL}  # nobody changed anything
            shop, edrone = shop_status[line.email], edrone_status.get(line.email, INITIAL)
            if len(want) > 1:
                counts["doubtful" if doubtful else "tied_at_resolution"] += 1
            if shop != edrone:
                counts["divergent"] += 1
            elif shop not in want:
                counts["wrong_winner"] += 1
            else:
                continue
            if shown < 3:
                shown += 1
                measured(await explain(run, db, mode, line, shop, edrone, want))
        traces = await db.fetchval("SELECT count(*) FROM sync_traces WHERE app_id = $1", app_id)
        corrective = await db.fetchval(
            "SELECT count(*) FROM sync_traces WHERE app_id = $1 AND corrective", app_id
        )
        webhooks = await db.fetchval("SELECT count(*) FROM inbox WHERE app_id = $1", app_id)
        counts.update(traces=traces, corrective_traces=corrective, webhooks=webhooks)
        results[mode] = counts
        measured(
            f"[convergence] {mode}: addresses={counts['addresses']}, changes={counts['changes']}, "
            f"traces={traces} (corrective {corrective}), webhooks={webhooks}, "
            f"tied_at_resolution={counts['tied_at_resolution']}, "
            f"echo_or_person={counts['doubtful']}, divergent={counts['divergent']}, "
            f"wrong_winner={counts['wrong_winner']}"
        )
    measured(
        f"[convergence] timelines driven in {driven_s:.1f} s, quiescent {settled_s:.1f} s later; "
        f"edrone: {dict(run.edrone.counts)}"
    )
    raced = most_raced(run.lines["table"])
    if raced is not None:
        history = await read_history(db, MODES["table"], raced.email)
        measured(f"[convergence] a raced address, as history shows it:\n{raced.describe()}")
        measured(render(history))
    return results


def most_raced(lines: list[Timeline]) -> Timeline | None:
    """The address whose changes on the two sides came closest together."""

    def closest(line: Timeline) -> float:
        made = sorted(line.made, key=lambda change: change.at)
        gaps = [(b.at - a.at).total_seconds() for a, b in pairwise(made) if a.side != b.side]
        return min(gaps, default=float("inf"))

    raced = [line for line in lines if len(line.made) >= 3]
    return min(raced, key=closest, default=None)


async def explain(run: Run, db, mode, line: Timeline, shop, edrone, want) -> str:
    app_id = MODES[mode]
    seen = sorted(run.edrone.log[(app_id, line.email)] + run.shops[mode].log[line.email])
    history = await read_history(db, app_id, line.email)
    return "\n".join(
        [
            f"[convergence] FAILED {mode} {line.email}: shop {shop}, edrone {edrone}, "
            f"the newest change a person made: {sorted(want)} (seed {SEED})",
            line.describe(),
            "what edrone and the shop saw:",
            *seen,
            "the bridge's history:",
            render(history),
        ]
    )
