"""``edrone-bridge backfill`` end to end: the command reads a Magento-like table or a file, the
trace forwarder consumes the background lane and fake-edrone counts the traces per address.
Each address is traced once, a second run sends nothing, a run killed mid-way and resumed
sends no address twice, a row read before an unsubscribe through the bridge does not undo it,
a dry run publishes and records nothing, and bad invocations change nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import Counter
from datetime import UTC, datetime

import pytest
import structlog

from bridge.amqp import declare_topology, topology
from bridge.app_config import AppConfig
from bridge.cli import main as cli
from bridge.cli.backfill import run_backfill
from bridge.cli.common import CommandFailed, UsageError
from bridge.ops import backfill_runs
from consumers import traces
from consumers.service import consumer_of
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import apply_burst, make_event, publish, ready_count, wait_until
from tests.support.shop_tables import MAGENTO_TABLE, MAGENTO_TARGET

# The forwarder on its background lane only (the priority lane's service is not built yet).
BACKFILL_LANE = dataclasses.replace(traces.PART, queue=lambda s: topology(s).backfill_queue)
CUSTOMERS = 12


@pytest.fixture
async def shop(make_traces, db, amqp_connection):
    """Settings with the Magento-like target (its change_status_at read as changed_at), aimed
    at the fake, every queue declared; the table holds CUSTOMERS rows, every third one
    unsubscribed (Magento's 3)."""
    target = {**MAGENTO_TARGET, "changed_at_column": "change_status_at"}
    settings = await make_traces(apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=target)})
    channel = await amqp_connection.channel()
    async with channel:
        await declare_topology(channel, settings)
    await db.execute(MAGENTO_TABLE)
    await db.execute(
        "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status)"
        " SELECT 'c' || n || '@example.com', CASE WHEN n % 3 = 0 THEN 3 ELSE 1 END"
        " FROM generate_series(1, $1) AS n",
        CUSTOMERS,
    )
    return settings


def command(*options: str):
    return cli.build_parser().parse_args(["backfill", "--app", TEST_APP_ID, *options])


async def forward(connection, pool, settings):
    """The forwarder on the background lane until it is idle; its counters."""
    async with (
        asyncio.timeout(30),
        consumer_of(BACKFILL_LANE, settings, connection, pool) as consumer,
        consumer,
    ):
        await consumer.run(burst=True)
    return consumer.counters


def traced(fake) -> Counter[str]:
    return Counter(r.form["email"] for r in fake.requests)


def everyone() -> Counter[str]:
    return Counter({f"c{n}@example.com": 1 for n in range(1, CUSTOMERS + 1)})


async def lane_depth(amqp_connection, settings) -> int:
    return await ready_count(amqp_connection, topology(settings).backfill_queue)


async def test_each_address_is_traced_once_and_a_second_run_sends_nothing(
    shop, fake, pool, amqp_connection, capsys
):
    assert await run_backfill(shop, command("--page-size", "5")) == 0
    first = capsys.readouterr().out
    assert f"read {CUSTOMERS} rows: {CUSTOMERS} queued, 0 skipped" in first
    await forward(amqp_connection, pool, shop)
    assert traced(fake) == everyone()
    statuses = {r.form["email"]: r.form["subscriber_status"] for r in fake.requests}
    assert statuses["c3@example.com"] == "0" and statuses["c1@example.com"] == "1"

    assert await run_backfill(shop, command("--page-size", "5")) == 0
    assert f"read {CUSTOMERS} rows: 0 queued, {CUSTOMERS} skipped" in capsys.readouterr().out
    assert await lane_depth(amqp_connection, shop) == 0
    await forward(amqp_connection, pool, shop)
    assert traced(fake) == everyone()
    runs = await pool.fetch("SELECT outcome FROM backfill_runs")
    assert [r["outcome"] for r in runs] == ["finished", "finished"]


async def test_a_file_with_sms_statuses_is_traced_once_per_customer(
    shop, fake, pool, amqp_connection, tmp_path, capsys
):
    path = tmp_path / "export.csv"
    path.write_text(
        "email,subscriber_status,phone,sms_subscriber_status,changed_at\n"
        "jan@example.com,1,+48500100200,1,2025-05-01T10:00:00Z\n"
        "bad address,1,,,\n"
        "anna@example.com,0,,,\n"
    )
    assert await run_backfill(shop, command("--file", str(path))) == 0
    out = capsys.readouterr().out
    assert "read 3 rows: 2 queued, 0 skipped" in out and "1 invalid" in out
    assert "line 3: email:" in out
    await forward(amqp_connection, pool, shop)
    forms = {r.form["email"]: r.form for r in fake.requests}
    assert traced(fake) == Counter({"jan@example.com": 1, "anna@example.com": 1})
    assert forms["jan@example.com"]["sms_subscriber_status"] == "1"
    assert forms["jan@example.com"]["phone"] == "+48500100200"


async def test_a_run_killed_mid_way_and_resumed_sends_every_address_once(
    shop, fake, pool, amqp_connection, monkeypatch, capsys
):
    """Killed once while waiting for room in the lane (two pages checkpointed), and once
    after the broker confirmed a page it did not checkpoint: each resume keeps the run_id, the
    page published again is the same messages, and the forwarder takes them for duplicates."""
    task = asyncio.create_task(run_backfill(shop, command("--page-size", "2", "--max-queued", "4")))
    checkpointed = "SELECT rows_read FROM backfill_runs WHERE finished_at IS NULL"
    await wait_until(lambda: _equals(pool.fetchval(checkpointed), 4), timeout_s=20)
    await asyncio.sleep(0.2)  # still waiting for room: nothing else checkpointed
    assert await pool.fetchval(checkpointed) == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await lane_depth(amqp_connection, shop) == 4

    checkpoint = backfill_runs.checkpoint

    async def die_on_the_second(conn, run):
        if run.counts.read == 8:  # page 4 is confirmed; its checkpoint is never written
            monkeypatch.undo()
            raise asyncio.CancelledError
        await checkpoint(conn, run)

    monkeypatch.setattr(backfill_runs, "checkpoint", die_on_the_second)
    with pytest.raises(asyncio.CancelledError):
        await run_backfill(shop, command("--page-size", "2"))
    assert await pool.fetchval(checkpointed) == 6
    assert await lane_depth(amqp_connection, shop) == 8

    assert await run_backfill(shop, command("--page-size", "2")) == 0
    assert "resumed" in capsys.readouterr().out
    assert await pool.fetchval("SELECT count(DISTINCT run_id) FROM backfill_runs") == 1
    counters = await forward(amqp_connection, pool, shop)
    assert traced(fake) == everyone()
    # Page 4's two rows, published twice: one batch coalesces them, two say duplicate.
    assert counters.sent == CUSTOMERS
    assert counters.skipped["coalesced"] + counters.skipped["duplicate"] == 2


async def test_an_unsubscribe_through_the_bridge_after_the_read_is_not_undone(
    shop, fake, pool, amqp_connection
):
    """c1 is read subscribed and queued; then edrone's unsubscribe of c1 is applied (the shop
    table written 3); the row, read before, is older than that: no trace resubscribes c1."""
    assert await run_backfill(shop, command()) == 0
    unsubscribe = make_event("c1@example.com", status=0, at=datetime.now(UTC))
    await publish(amqp_connection, shop, [unsubscribe])
    await apply_burst(amqp_connection, pool, shop)
    status = "SELECT subscriber_status FROM newsletter_subscriber WHERE subscriber_email = $1"
    assert await pool.fetchval(status, "c1@example.com") == 3

    counters = await forward(amqp_connection, pool, shop)
    assert "c1@example.com" not in traced(fake)
    assert traced(fake) == everyone() - Counter({"c1@example.com": 1})
    assert counters.skipped["older"] == 1
    assert await pool.fetchval(status, "c1@example.com") == 3


async def test_a_dry_run_publishes_and_records_nothing(shop, db, pool, amqp_connection, capsys):
    """Known rows are counted as skipped; the others are judged by the forwarder's rule on
    the states as stored: c2 has no sync state, but edrone's ledger holds it unsubscribed
    (since after the date floor), so its undated row is older; the new addresses win."""
    await db.execute(
        "INSERT INTO sync_state (app_id, channel, address, shop_known, shop_status)"
        " VALUES ($1, 'email', 'c1@example.com', true, 1)",
        TEST_APP_ID,
    )
    await db.execute(
        "INSERT INTO subscribers (app_id, channel, address, status, event_id, event_date,"
        " ordered_at) VALUES ($1, 'email', 'c2@example.com', 0, 'w-1', now(), now())",
        TEST_APP_ID,
    )
    assert await run_backfill(shop, command("--dry-run", "--sample", "2")) == 0
    out = capsys.readouterr().out
    assert f"read {CUSTOMERS} rows: {CUSTOMERS - 1} would be queued, 1 skipped" in out
    assert "email subscribed 8, email unsubscribed 4" in out
    assert f"{CUSTOMERS - 1} new (no sync state), 1 known (skipped), 0 differ" in out
    assert f"wins {CUSTOMERS - 2}, older 1" in out
    assert "the first 2 rows that would be sent:" in out
    assert "c2@example.com subscriber_status=1" in out
    assert await lane_depth(amqp_connection, shop) == 0
    assert await pool.fetchval("SELECT count(*) FROM backfill_runs") == 0
    assert await pool.fetchval("SELECT count(*) FROM sync_state") == 1


async def test_two_backfills_of_one_app_do_not_run_at_once(shop, pool, amqp_connection):
    first = asyncio.create_task(
        run_backfill(shop, command("--page-size", "2", "--max-queued", "2"))
    )
    await wait_until(lambda: _equals(pool.fetchval("SELECT rows_read FROM backfill_runs"), 2))
    with pytest.raises(CommandFailed, match="another backfill of app"):
        await run_backfill(shop, command())
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await pool.fetchval("SELECT count(*) FROM backfill_runs") == 1
    assert await lane_depth(amqp_connection, shop) == 2


async def test_a_dry_run_tells_what_the_resumed_run_would_read(shop, pool, amqp_connection, capsys):
    task = asyncio.create_task(run_backfill(shop, command("--page-size", "2", "--max-queued", "2")))
    await wait_until(lambda: _equals(pool.fetchval("SELECT rows_read FROM backfill_runs"), 2))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await run_backfill(shop, command("--dry-run")) == 0
    out = capsys.readouterr().out
    assert "after 2 rows read" in out and f"read {CUSTOMERS - 2} rows" in out
    assert await run_backfill(shop, command("--dry-run", "--restart")) == 0
    assert f"read {CUSTOMERS} rows" in capsys.readouterr().out
    assert await pool.fetchval("SELECT rows_read FROM backfill_runs") == 2
    assert await lane_depth(amqp_connection, shop) == 2


class TestUsage:
    async def test_unknown_app(self, shop, pool, amqp_connection):
        args = cli.build_parser().parse_args(["backfill", "--app", "nope"])
        with pytest.raises(UsageError, match="no app 'nope' is configured"):
            await run_backfill(shop, args)
        await self.nothing_done(shop, pool, amqp_connection)

    async def test_app_without_target_and_no_file(self, make_traces, pool, amqp_connection):
        settings = await make_traces()
        with pytest.raises(UsageError, match=r"has no \[apps\..*\.target\] table to read"):
            await run_backfill(settings, command())
        await self.nothing_done(settings, pool, amqp_connection)

    async def test_missing_file(self, shop, pool, amqp_connection, tmp_path):
        with pytest.raises(UsageError, match="no file"):
            await run_backfill(shop, command("--file", str(tmp_path / "gone.csv")))
        await self.nothing_done(shop, pool, amqp_connection)

    async def test_a_header_without_email(self, shop, pool, amqp_connection, tmp_path):
        path = tmp_path / "export.csv"
        path.write_text("mail,subscriber_status\njan@example.com,1\n")
        with pytest.raises(UsageError, match="the header has no email field"):
            await run_backfill(shop, command("--file", str(path)))
        await self.nothing_done(shop, pool, amqp_connection)

    async def test_observed_at_without_a_file(self, shop, pool, amqp_connection):
        with pytest.raises(UsageError, match="--observed-at is for --file"):
            await run_backfill(shop, command("--observed-at", "2026-01-01T00:00:00Z"))
        await self.nothing_done(shop, pool, amqp_connection)

    def test_the_command_exits_2_with_the_message(self, settings, capsys, monkeypatch):
        """As typed: one line on stderr, exit code 2 (the logging it configures put back)."""
        for name in [n for n in os.environ if n.startswith("EDRONE_BRIDGE_")]:
            monkeypatch.delenv(name)
        root = logging.getLogger()
        handlers, level, config = root.handlers[:], root.level, structlog.get_config()
        for name, value in {
            "EDRONE_BRIDGE_AMQP_URL": settings.amqp_url.get_secret_value(),
            "EDRONE_BRIDGE_DATABASE_URL": settings.database_url.get_secret_value(),
            "EDRONE_BRIDGE_DATABASE_SCHEMA": settings.database_schema,
            "EDRONE_BRIDGE_APPS": f"{TEST_APP_ID}:{TEST_SECRET}",
        }.items():
            monkeypatch.setenv(name, value)
        try:
            assert cli.main(["backfill", "--app", "nope"]) == 2
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            structlog.configure(**config)
        assert "edrone-bridge backfill: no app 'nope' is configured" in capsys.readouterr().err

    @staticmethod
    async def nothing_done(settings, pool, amqp_connection):
        assert await lane_depth(amqp_connection, settings) == 0
        assert await pool.fetchval("SELECT count(*) FROM backfill_runs") == 0


async def _equals(value, expected) -> bool:
    return await value == expected
