"""``reconcile``: each kind of planted drift between a Magento-like shop table (its outbox trigger
installed), the sync state and an export of edrone's is found with its kind and the side that
should win; ``--repair`` hands it to the consumers (both running, the forwarder on its
background lane; fake-edrone for edrone's trace API), after which no drift is left but the
resubscription left for a person. Bad input changes and sends nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest

from bridge.amqp import declare_topology, declare_trace_topology, topology
from bridge.app_config import AppConfig
from bridge.cli.common import EXIT_DRIFT, EXIT_USAGE
from bridge.db import create_pool
from bridge.devtools.fake_edrone import FakeEdrone
from bridge.metrics import Metrics
from bridge.ops.drift import KINDS
from bridge.ops.drift_check import check_on_schedule, check_once
from bridge.ops.reconcile import reconcile, repairing
from bridge.relay.triggers import install_triggers
from bridge.shop_table import resolve_target
from consumers import traces
from consumers.service import serve
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.cli import run_cli_async
from tests.support.consumers import (
    BASE_DATE,
    TRACE_FAST,
    apply_burst,
    make_event,
    publish,
    ready_count,
    serve_subscriptions,
    wait_until,
)
from tests.support.shop_tables import MAGENTO_TABLE, MAGENTO_TARGET

UNSUB, SUB = 3, 1  # Magento's values
TABLE = "newsletter_subscriber"
EXPECTED = {
    "never@example.com": ("never_synced", "shop"),
    "unseen@example.com": ("shop_changed_unseen", "shop"),
    "resub@example.com": ("needs_review", None),
    "stale@example.com": ("never_synced", "state"),
    "behind@example.com": ("shop_behind", "state"),
    "export@example.com": ("edrone_changed_unseen", "edrone"),
}


@pytest.fixture
async def pool(db, settings):
    value = await create_pool(settings, command_timeout_s=30)
    yield value
    await asyncio.wait_for(value.close(), 10)


@pytest.fixture
async def fake():
    async with FakeEdrone() as server:
        yield server


@pytest.fixture
def bridge(make_settings, fake):
    """The app with the Magento mapping, fast consumers aimed at fake-edrone, a short
    staleness margin for rows."""
    return make_settings(
        trace_url=fake.url,
        apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=MAGENTO_TARGET)},
        traces=TRACE_FAST,
        subscriptions={"flush_interval_ms": 10},
        sync={"echo_latency_s": 0.05, "dispatch_poll_interval_s": 0.2},
    )


@pytest.fixture
async def planted(bridge, make_settings, db, pool, amqp_connection, tmp_path):
    """Every kind of drift planted (see EXPECTED); ``synced@`` is in step everywhere. Yields
    the export file."""
    channel = await amqp_connection.channel()
    async with channel:
        await declare_topology(channel, bridge)
        await declare_trace_topology(channel, bridge)
    await db.execute(MAGENTO_TABLE)
    emails = ["synced", "unseen", "resub", "stale", "behind", "export"]
    await db.execute(
        "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
        "SELECT unnest($1::text[]) || '@example.com', 1",
        emails,
    )
    target = await resolve_target(db, TEST_APP_ID, bridge.apps[TEST_APP_ID].target)
    await install_triggers(db, bridge, {TEST_APP_ID: target})
    # In step: edrone's changes applied to the state and the table.
    synced = [
        make_event(f"{name}@example.com", status=0 if name == "resub" else 1, at=timedelta(n))
        for n, name in enumerate(["synced", "unseen", "resub", "behind", "export"])
    ]
    await publish(amqp_connection, bridge, synced)
    await apply_burst(amqp_connection, pool, bridge)
    # A failed write: edrone's unsubscribe applied while the app had no table mapped.
    untargeted = make_settings(apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET)})
    await publish(amqp_connection, bridge, [make_event("stale@example.com", status=0)])
    await apply_burst(amqp_connection, pool, untargeted)
    # Changes the trigger never saw, and a customer the bridge never heard of.
    await db.execute("ALTER TABLE newsletter_subscriber DISABLE TRIGGER ALL")
    await db.execute(
        "UPDATE newsletter_subscriber SET subscriber_status = CASE subscriber_email "
        "WHEN 'unseen@example.com' THEN 3 ELSE 1 END "
        "WHERE subscriber_email IN ('unseen@example.com', 'resub@example.com')"
    )
    await db.execute("ALTER TABLE newsletter_subscriber ENABLE TRIGGER ALL")
    await db.execute(
        "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
        "VALUES ('never@example.com', 1)"
    )
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1  # the new customer's
    await db.execute("DELETE FROM outbox")
    # A write that never happened: the winner moved on, the shop did not.
    await db.execute(
        "UPDATE sync_state SET status = 0, made_at = now(), event_id = 'planted' "
        "WHERE address = 'behind@example.com'"
    )
    # edrone changed without a webhook: only its export tells.
    export = tmp_path / "edrone.csv"
    later = (BASE_DATE + timedelta(days=30)).strftime("%Y-%m-%d %H:%M:%S")
    export.write_text(
        "email,subscriber_status,changed_at\n"
        f"SYNCED@example.com,1,{later}\n"
        f"export@example.com,0,{later}\n"
    )
    return export


async def found(pool, settings, export: Path | None = None, **options):
    target = await resolve_target(pool, TEST_APP_ID, settings.apps[TEST_APP_ID].target)
    listed = []
    report = await reconcile(pool, settings, target, export=export, show=listed.append, **options)
    return report, {d.address: (d.kind, d.winner) for d in listed}


async def consumers_settle(bridge, amqp_connection, pool, export):
    """Both consumers (the forwarder on the background lane) until reconcile finds only what
    is left for a person."""
    stopping = asyncio.Event()
    lane = dataclasses.replace(traces.PART, queue=lambda s: topology(s).backfill_queue)
    tasks = [
        asyncio.create_task(serve_subscriptions(bridge, stopping)),
        asyncio.create_task(serve(lane, bridge, stopping)),
        asyncio.create_task(serve(traces.PART, bridge, stopping)),
    ]
    try:

        async def settled():
            _, left = await found(pool, bridge, export)
            return left == {"resub@example.com": ("needs_review", None)}

        await wait_until(settled, 30)
    finally:
        stopping.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)


async def test_finds_each_kind_and_repair_leaves_no_drift(
    bridge, planted, pool, db, fake, amqp_connection
):
    report, listed = await found(pool, bridge, planted)
    assert listed == EXPECTED
    assert report.export_rows == 2 and report.total == len(EXPECTED)

    without_export, listed = await found(pool, bridge)
    assert without_export.export_rows is None
    assert "export@example.com" not in listed and len(listed) == len(EXPECTED) - 1

    repaired, _ = await found(pool, bridge, planted, repair=lambda: repairing(bridge, TEST_APP_ID))
    # A row for each shop-side difference but the one left for a person; one edrone change.
    assert dict(repaired.repaired) == {"shop_rows": 4, "edrone_changes": 1, "left_for_review": 1}
    lane = topology(bridge).backfill_queue
    assert await ready_count(amqp_connection, lane) == 4
    assert await ready_count(amqp_connection, topology(bridge).subscriptions_queue) == 1

    await consumers_settle(bridge, amqp_connection, pool, planted)

    traced = {r.form["email"]: r.form["subscriber_status"] for r in fake.requests}
    assert traced == {"never@example.com": "1", "unseen@example.com": "0",
                      "behind@example.com": "0"}  # fmt: skip
    rows = dict(
        await db.fetch("SELECT subscriber_email, subscriber_status FROM newsletter_subscriber")
    )
    assert rows == {"synced@example.com": SUB, "unseen@example.com": UNSUB,
                    "resub@example.com": SUB, "stale@example.com": UNSUB,
                    "behind@example.com": UNSUB, "export@example.com": UNSUB,
                    "never@example.com": SUB}  # fmt: skip


def drift(metrics: Metrics) -> dict[str, float]:
    """The gauge's non-zero values by kind."""
    values = {}
    for kind in KINDS:
        labels = {"app_id": TEST_APP_ID, "kind": kind}
        value = metrics.registry.get_sample_value("edrone_bridge_drift_addresses", labels)
        if value:
            values[kind] = value
    return values


async def test_the_drift_check_counts_by_kind_until_repaired(
    bridge, planted, pool, amqp_connection
):
    """The scheduled check counts what reconcile lists (without the export) into the gauge;
    with a settle time, the addresses acted on lately wait; after the repair only the
    resubscription left for a person counts."""
    metrics = Metrics()
    assert await check_once(pool, bridge, metrics, settle_s=0.0) is not None
    assert drift(metrics) == {"never_synced": 2, "shop_changed_unseen": 1, "needs_review": 1,
                              "shop_behind": 1}  # fmt: skip

    await check_once(pool, bridge, metrics, settle_s=3600)
    assert drift(metrics) == {"never_synced": 1}  # the row the bridge never touched

    await found(pool, bridge, planted, repair=lambda: repairing(bridge, TEST_APP_ID))
    await consumers_settle(bridge, amqp_connection, pool, planted)
    await check_once(pool, bridge, metrics, settle_s=0.0)
    assert drift(metrics) == {"needs_review": 1}


async def test_one_process_counts_at_a_time(bridge, planted, pool, db):
    """While another process holds the check's lock, a round is skipped."""
    key = f"edrone-bridge drift {bridge.database_schema}"
    await db.execute("SELECT pg_advisory_lock(hashtext($1))", key)
    try:
        assert await check_once(pool, bridge, Metrics(), settle_s=0.0) is None
    finally:
        await db.execute("SELECT pg_advisory_unlock(hashtext($1))", key)


PLAIN = ("table", "address_column", "email_status_column", "set_now")


def cli_config(bridge, tmp_path: Path, **variables: str) -> dict[str, str]:
    """The command's environment: the test's services, the app with its target in a file, and
    a second app without one."""
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[apps.{TEST_APP_ID}]\nsecret = "{TEST_SECRET}"\n'
        f"[apps.{TEST_APP_ID}.target]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in MAGENTO_TARGET.items() if k in PLAIN)
        + "email_status_values = { subscribed = 1, unsubscribed = 3 }\n"
        '[apps.plain]\nsecret = "s"\n'
    )
    return {
        "EDRONE_BRIDGE_CONFIG": str(config),
        "EDRONE_BRIDGE_DATABASE_URL": bridge.database_url.get_secret_value(),
        "EDRONE_BRIDGE_DATABASE_SCHEMA": bridge.database_schema,
        "EDRONE_BRIDGE_AMQP_URL": bridge.amqp_url.get_secret_value(),
        "EDRONE_BRIDGE_AMQP_PREFIX": bridge.amqp_prefix,
        "EDRONE_BRIDGE_LOG_LEVEL": "warning",
        **variables,
    }


async def test_the_command_streams_json_lines_and_exits_3_on_drift(bridge, planted, tmp_path):
    env = cli_config(bridge, tmp_path)
    code, stdout, stderr = await run_cli_async(
        "reconcile", "--app", TEST_APP_ID, "--edrone-export", str(planted), "--json",
        "--limit", "2", **env,
    )  # fmt: skip
    assert code == EXIT_DRIFT, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    *listed, summary = lines
    assert [d["address"] for d in listed] == ["behind@example.com", "export@example.com"]
    assert listed[1]["kind"] == "edrone_changed_unseen" and listed[1]["why"]
    assert summary["summary"]["differences"] == len(EXPECTED)
    assert summary["summary"]["listed"] == 2 and summary["summary"]["edrone_compared"]

    code, stdout, _ = await run_cli_async("reconcile", "--app", TEST_APP_ID, **env)
    assert code == EXIT_DRIFT
    assert "edrone's side not compared" in stdout and "never_synced: 2" in stdout


async def test_no_drift_exits_0(bridge, db, tmp_path):
    await db.execute(MAGENTO_TABLE)
    code, stdout, stderr = await run_cli_async(
        "reconcile", "--app", TEST_APP_ID, **cli_config(bridge, tmp_path)
    )
    assert (code, stderr) == (0, "")
    assert "no drift" in stdout


@pytest.mark.parametrize(
    ("args", "content", "message"),
    [
        (["--app", "nobody"], None, "--app 'nobody' is not a configured app"),
        (["--app", "plain"], None, "app 'plain' has no [apps.plain.target]"),
        (["--app", TEST_APP_ID, "--edrone-export", "/nonexistent.csv"], None, "cannot be read"),
        (["--app", TEST_APP_ID], "mail,status\na@example.com,1\n", "the header has no email"),
        (["--app", TEST_APP_ID], "email,subscriber_status\na@example.com,yes\n",
         "line 2: subscriber_status: 'yes' is not 1, 0 or empty"),
        (["--app", TEST_APP_ID], '{"email": "a@example.com"}\n', "line 1: no subscriber_status"),
        (["--app", TEST_APP_ID], b"\xff\xfe\x00", "not UTF-8"),
    ],
)  # fmt: skip
async def test_bad_input_is_a_usage_error_and_sends_nothing(
    bridge, planted, pool, amqp_connection, db, tmp_path, args, content, message
):
    if content is not None:
        export = tmp_path / "export.csv"
        if isinstance(content, bytes):
            export.write_bytes(content)
        else:
            export.write_text(content)
        args = [*args, "--edrone-export", str(export)]
    before = await db.fetch("SELECT * FROM sync_state ORDER BY address")
    code, stdout, stderr = await run_cli_async(
        "reconcile", *args, "--repair", **cli_config(bridge, tmp_path)
    )
    assert code == EXIT_USAGE, stderr
    assert message in stderr and stdout == ""
    for queue in (topology(bridge).backfill_queue, topology(bridge).subscriptions_queue):
        assert await ready_count(amqp_connection, queue) == 0
    assert await db.fetch("SELECT * FROM sync_state ORDER BY address") == before


async def test_the_check_runs_on_its_schedule_until_stopped(make_settings, bridge, planted):
    """EDRONE_BRIDGE_DRIFT_INTERVAL_S: a round every interval sets the gauge; a stop ends it."""
    scheduled = make_settings(
        apps=bridge.apps, drift_interval_s=0.05, drift_settle_s=0.0, sync=bridge.sync
    )
    pool = await create_pool(scheduled, command_timeout_s=30)
    metrics, stopping = Metrics(), asyncio.Event()
    task = asyncio.create_task(check_on_schedule(pool, scheduled, metrics, stopping=stopping))
    try:
        await wait_until(lambda: drift(metrics).get("never_synced") == 2)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(pool.close(), 10)
