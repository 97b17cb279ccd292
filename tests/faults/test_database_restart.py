"""PostgreSQL "restarted" (every connection cut, new ones refused, then back) while the
subscription consumer applies a backlog: the batch is retried with backoff, nothing is acked
before its transaction commits, and the pool reconnects by itself (docs/design.md promise 2)."""

from __future__ import annotations

import asyncio

from bridge.amqp import declare_topology, topology
from tests.support.consumers import make_event, publish, ready_count, serve_subscriptions
from tests.support.processes import (
    FAST_SUBSCRIPTIONS,
    check_ledger,
    history,
    report,
    through,
    wait_for_count,
)

INBOX = "SELECT count(*) FROM inbox"


class TestDatabaseRestart:
    async def test_backlog_is_applied_exactly_once_across_two_restarts(
        self, make_settings, settings, db_proxy, amqp_connection, db, consumers_made, capsys
    ):
        """3,000 queued events, and the database cut twice while they are applied (once for a
        second, once briefly): all 3,000 end in the inbox exactly once, the ledger holds the
        newest change of every address, and the work and dead-letter queues end empty."""
        bridge = make_settings(
            database_url=through(settings.database_url.get_secret_value(), db_proxy),
            subscriptions=FAST_SUBSCRIPTIONS,
        )
        changes = history(3000, addresses=300, seed=2, tag="pg")
        channel = await amqp_connection.channel()
        async with channel:
            await declare_topology(channel, bridge)
        await publish(
            amqp_connection,
            bridge,
            [
                make_event(c.address, status=c.status, at=c.event_date, event_id=c.event_id)
                for c in changes
            ],
        )
        stopping = asyncio.Event()
        consuming = asyncio.create_task(
            serve_subscriptions(bridge, stopping, started=consumers_made.append)
        )
        outages = []
        try:
            for reached, outage_s in ((600, 1.0), (1800, 0.2)):
                before = await wait_for_count(db, INBOX, reached, 30)
                await db_proxy.cut()
                await asyncio.sleep(outage_s)
                outages.append((before, await db.fetchval(INBOX)))
                await db_proxy.restore()
            stored = await wait_for_count(db, INBOX, len(changes), 60)
        finally:
            stopping.set()
            async with asyncio.timeout(30):
                await consuming
        names = topology(bridge)
        queue = names.subscriptions_queue
        left = await ready_count(amqp_connection, queue)
        dead = await ready_count(amqp_connection, names.dead_letter_queue(queue))
        check = await check_ledger(db, changes)
        counters = consumers_made[0].counters
        report(
            capsys,
            "3,000 queued events, PostgreSQL cut 2x",
            sent=len(changes),
            acked=counters.applied + counters.skipped.total(),
            stored=stored,
            acked_applied=counters.applied,
            acked_older=counters.skipped["older"],
            duplicates_absorbed=counters.skipped["duplicate"],
            batch_retries=counters.retries,
            missing=len(check.missing),
            wrong_ledger_rows=len(check.wrong),
            queue_left=left,
            dead_lettered=dead,
        )
        assert len(outages) == 2 and counters.retries >= 2, "the cuts never reached a batch"
        assert check.ok, (check.missing[:5], check.unexpected[:5], check.wrong[:5])
        assert stored == len(changes)
        # One acked outcome per message: no AMQP fault here, so no redelivery; a "duplicate"
        # is a batch whose COMMIT went through but whose answer the cut swallowed.
        assert counters.applied + counters.skipped.total() == len(changes)
        assert (left, dead) == (0, 0)
