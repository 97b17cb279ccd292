"""backfill's run against real RabbitMQ and PostgreSQL: every valid row published once, rows the
bridge knows the shop holds skipped, the position checkpointed only after a page's publishes
are confirmed, a stopped run resumed with its run_id (so its rows keep their ids), and one
backfill per app at a time."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from bridge.amqp import topology
from bridge.db import create_pool
from bridge.ops import backfill, backfill_runs
from bridge.ops.backfill_file import FileSource
from bridge.ops.backfill_runs import RunRefused
from bridge.ops.row_lane import open_lane
from schemas.shop_row import ShopRow
from tests.support.apps import TEST_APP_ID
from tests.support.consumers import take_all

ROWS = 7


@pytest.fixture
async def pool(db, settings):
    value = await create_pool(settings, command_timeout_s=10.0)
    yield value
    await asyncio.wait_for(value.close(), 10)


def export(tmp_path, count=ROWS, name="export.csv"):
    lines = ["email,subscriber_status,phone,sms_subscriber_status"]
    lines += [f"c{n}@example.com,{n % 2},+4850010020{n},1" for n in range(count)]
    lines.insert(3, "broken,1,,")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


async def start(pool, source, *, restart=False):
    async with pool.acquire() as conn:
        return await backfill_runs.start(
            conn, TEST_APP_ID, source.label, source.version, restart=restart
        )


async def go(pool, settings, source, job):
    """Run ``job`` on ``source``; the invalid rows of each page."""
    reader = backfill.Reader(pool, TEST_APP_ID, job.run_id, settings.phone_region)
    seen = []
    async with (
        backfill_runs.exclusive(pool, TEST_APP_ID) as conn,
        open_lane(settings, "test backfill", max_depth=1000) as lane,
    ):
        await backfill.run(reader, source, job, lane, conn, lambda c, i: seen.append(i))
    return seen


def killed_before_checkpoint(monkeypatch, pages):
    """The run stops (cancelled) once the broker confirmed page ``pages + 1``, before its
    checkpoint: as a process killed there."""
    checkpoint = backfill_runs.checkpoint
    done = []

    async def checkpoint_or_die(conn, run):
        if len(done) == pages:
            monkeypatch.undo()
            raise asyncio.CancelledError
        done.append(run.position)
        await checkpoint(conn, run)

    monkeypatch.setattr(backfill_runs, "checkpoint", checkpoint_or_die)


async def lane_rows(amqp_connection, settings):
    taken = await take_all(amqp_connection, topology(settings).backfill_queue)
    return [(m.message_id, ShopRow.model_validate(json.loads(m.body))) for m in taken]


async def test_a_run_publishes_each_valid_row_and_records_its_counts(
    tmp_path, pool, settings, amqp_connection
):
    source = FileSource(export(tmp_path), "csv", 3)
    job = await start(pool, source)
    invalid = await go(pool, settings, source, job)
    published = await lane_rows(amqp_connection, settings)
    assert [row.email for _, row in published] == [f"c{n}@example.com" for n in range(ROWS)]
    assert all(mid == row.event_id and row.run_id == job.run_id for mid, row in published)
    assert {row.source for _, row in published} == {"backfill"}
    assert [[i.where for i in page] for page in invalid] == [["line 4"], [], []]
    stored = await pool.fetchrow("SELECT * FROM backfill_runs")
    assert (stored["rows_read"], stored["queued"], stored["skipped"], stored["invalid"]) == (
        8,
        7,
        0,
        1,
    )
    assert stored["outcome"] == "finished" and stored["finished_at"] is not None
    assert json.loads(stored["position"]) == 8


async def test_rows_the_shop_is_known_to_hold_are_skipped(
    tmp_path, db, pool, settings, amqp_connection
):
    """Skipped only where every address of the row is known held: c0's e-mail (0) and SMS
    (1) are; c1's e-mail is held but its SMS status is not known; c2's differs."""
    for channel, address, status in [
        ("email", "c0@example.com", 0),
        ("sms", "+48500100200", 1),
        ("email", "c1@example.com", 1),
        ("email", "c2@example.com", 1),
    ]:
        await db.execute(
            "INSERT INTO sync_state (app_id, channel, address, shop_known, shop_status)"
            " VALUES ($1, $2, $3, true, $4)",
            TEST_APP_ID,
            channel,
            address,
            status,
        )
    source = FileSource(export(tmp_path, count=3), "csv", 10)
    job = await go_fresh(pool, settings, source)
    published = await lane_rows(amqp_connection, settings)
    assert [row.email for _, row in published] == ["c1@example.com", "c2@example.com"]
    assert (job.counts.queued, job.counts.skipped) == (2, 1)


async def go_fresh(pool, settings, source):
    job = await start(pool, source)
    await go(pool, settings, source, job)
    return job


async def test_a_run_stopped_before_a_checkpoint_resumes_with_the_same_ids(
    tmp_path, pool, settings, amqp_connection, monkeypatch
):
    """Stopped after page 2 was confirmed but not checkpointed: the next start resumes the
    same run from page 1's end, so page 2's rows are published again with the same ids (the
    forwarder's inbox takes them for duplicates) and every row is published."""
    source = FileSource(export(tmp_path), "csv", 3)
    job = await start(pool, source)
    killed_before_checkpoint(monkeypatch, pages=1)
    with pytest.raises(asyncio.CancelledError):
        await go(pool, settings, source, job)
    stored = await pool.fetchrow("SELECT * FROM backfill_runs")
    assert stored["finished_at"] is None and json.loads(stored["position"]) == 3
    first = await lane_rows(amqp_connection, settings)
    assert len(first) == 5  # pages 1 and 2, the broken row not among them

    again = await start(pool, source)
    assert (again.run_id, again.resumed, again.position) == (job.run_id, True, 3)
    assert again.counts.read == 3
    await go(pool, settings, source, again)
    second = await lane_rows(amqp_connection, settings)
    assert [mid for mid, _ in second][:3] == [mid for mid, _ in first][2:]
    emails = {row.email for _, row in first + second}
    assert emails == {f"c{n}@example.com" for n in range(ROWS)}
    done = await pool.fetchrow("SELECT * FROM backfill_runs")
    assert (done["rows_read"], done["queued"], done["invalid"]) == (8, 7, 1)


async def test_restart_gives_the_unfinished_run_up(tmp_path, pool):
    source = FileSource(export(tmp_path), "csv", 3)
    job = await start(pool, source)
    fresh = await start(pool, source, restart=True)
    assert fresh.run_id != job.run_id and not fresh.resumed
    outcomes = await pool.fetch("SELECT run_id, outcome FROM backfill_runs ORDER BY started_at")
    assert {r["run_id"]: r["outcome"] for r in outcomes} == {
        job.run_id: "restarted",
        fresh.run_id: None,
    }


async def test_a_changed_file_is_not_resumed(tmp_path, pool):
    path = export(tmp_path)
    await start(pool, FileSource(path, "csv", 3))
    path.write_text(path.read_text() + "late@example.com,1,,\n")
    os.utime(path, ns=(1, 1))
    with pytest.raises(RunRefused, match="the file has changed"):
        await start(pool, FileSource(path, "csv", 3))
    assert await pool.fetchval("SELECT count(*) FROM backfill_runs") == 1


async def test_one_backfill_per_app_at_a_time(pool):
    async with backfill_runs.exclusive(pool, TEST_APP_ID):
        with pytest.raises(RunRefused, match="another backfill of app"):
            async with backfill_runs.exclusive(pool, TEST_APP_ID):
                pass
        async with backfill_runs.exclusive(pool, "another-app"):
            pass
    async with backfill_runs.exclusive(pool, TEST_APP_ID):
        pass  # released with the block
