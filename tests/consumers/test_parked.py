"""The runtime keeps the ages of what it parks (bridge/parked.py): a dead letter's and a retry's
age recorded once its copy is confirmed, a retry's forgotten when its tier hands it back; and
``dlq replay`` and ``dlq purge`` forget what they remove. Against the real broker and
database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest

from bridge.amqp import declare_topology, declare_trace_topology, topology
from bridge.headers import HEADER_DEAD_LETTERED_AT, HEADER_PARKED_IN, as_datetime
from bridge.ops import dlq
from bridge.parked import Ledger
from bridge.part_settings import ConsumerOptions, TraceSettings
from consumers.outcomes import Defer, Outcome, Reject
from consumers.runtime import Consumer
from consumers.spec import ConsumerSpec
from tests.support.consumers import take_all, wait_until

TIER_S = 1.0


@pytest.fixture
def tier_settings(make_settings):
    return make_settings(traces=TraceSettings(retry_tiers_s=(TIER_S,)))


@pytest.fixture
async def declared(amqp_connection, tier_settings):
    channel = await amqp_connection.channel()
    async with channel:
        await declare_topology(channel, tier_settings)
        await declare_trace_topology(channel, tier_settings)
    return amqp_connection


async def rows(db: asyncpg.Connection) -> list[tuple[str, str, int]]:
    found = await db.fetch("SELECT queue, message_id, copies FROM parked_messages ORDER BY 1, 2")
    return [(r["queue"], r["message_id"], r["copies"]) for r in found]


def traces_consumer(connection, settings, pool, handler) -> Consumer:
    names = topology(settings)
    spec = ConsumerSpec(names.traces_queue, handler, 10.0, retry_tiers_s=(TIER_S,))
    return Consumer(
        connection,
        spec,
        ConsumerOptions(batch_size=10, prefetch=20, flush_interval_ms=20),
        topology=names,
        publish_timeout_s=settings.publish_timeout_s,
        ledger=Ledger(pool, timeout_s=5),
    )


async def test_dead_letters_and_retries_are_aged_and_returns_forgotten(declared, tier_settings, db):
    """A rejected message (without a message_id) is parked in the DLQ under the id its copy
    was given, aged from its dead-lettering; a deferred one is aged in its tier while it
    waits and forgotten once the tier hands it back and it is applied."""
    names = topology(tier_settings)
    dead_letter_queue = names.dead_letter_queue(names.traces_queue)
    tier = names.retry_queue(names.traces_queue, TIER_S)
    seen: list[bytes] = []

    async def handler(deliveries):
        outcomes = []
        for d in deliveries:
            if d.body == b"bad":
                outcomes.append(Reject("refused"))
            elif d.body == b"later" and seen.count(b"later") == 0:
                outcomes.append(Defer("edrone busy"))
            else:
                outcomes.append(Outcome.APPLIED)
            seen.append(d.body)
        return outcomes

    pool = await asyncpg.create_pool(
        tier_settings.database_url.get_secret_value(),
        min_size=1,
        max_size=2,
        server_settings={"search_path": tier_settings.database_schema},
    )
    channel = await declared.channel(publisher_confirms=True)
    async with channel:
        await channel.default_exchange.publish(
            aio_pika.Message(b"bad"), names.traces_queue, mandatory=True, timeout=5
        )
        await channel.default_exchange.publish(
            aio_pika.Message(b"later", message_id="evt-later"),
            names.traces_queue,
            mandatory=True,
            timeout=5,
        )
    in_tier: list[tuple[str, str, int]] = []
    try:
        consumer = traces_consumer(declared, tier_settings, pool, handler)
        async with asyncio.timeout(20), consumer:
            run = asyncio.create_task(consumer.run())
            await wait_until(lambda: len(seen) >= 2)

            async def both_parked() -> bool:
                nonlocal in_tier
                in_tier = await rows(db)
                return len(in_tier) == 2

            await wait_until(both_parked, timeout_s=5)
            await wait_until(lambda: consumer.counters.applied >= 1, timeout_s=10)
            await asyncio.sleep(0.2)  # the release follows the ack
            await consumer.stop()
            await run
    finally:
        await pool.close()
    [dead] = await take_all(declared, dead_letter_queue)
    assert dead.message_id  # given one: the confirm and the ledger know the copy by it
    assert dead.headers[HEADER_PARKED_IN] == dead_letter_queue
    assert (dead_letter_queue, dead.message_id, 1) in in_tier
    assert (tier, "evt-later", 1) in in_tier
    left = await db.fetch("SELECT queue, message_id, since FROM parked_messages")
    assert [(r["queue"], r["message_id"]) for r in left] == [(dead_letter_queue, dead.message_id)]
    assert left[0]["since"] == as_datetime(dead.headers[HEADER_DEAD_LETTERED_AT])


async def test_a_first_failure_time_that_does_not_parse_is_aged_from_now(
    declared, tier_settings, db
):
    """A message that brings its own unreadable x-first-failure-at is deferred once, into one
    copy (not one per retry of a publish that was confirmed), aged from when it was parked."""
    names = topology(tier_settings)
    tier = names.retry_queue(names.traces_queue, TIER_S)
    deferred: list[bytes] = []

    async def handler(deliveries):
        deferred.extend(d.body for d in deliveries)
        return [Defer("edrone busy") if len(deferred) == 1 else Outcome.APPLIED] * len(deliveries)

    pool = await asyncpg.create_pool(
        tier_settings.database_url.get_secret_value(),
        min_size=1,
        max_size=2,
        server_settings={"search_path": tier_settings.database_schema},
    )
    channel = await declared.channel(publisher_confirms=True)
    async with channel:
        message = aio_pika.Message(
            b"odd", message_id="evt-odd", headers={"x-first-failure-at": "not a time"}
        )
        await channel.default_exchange.publish(
            message, names.traces_queue, mandatory=True, timeout=5
        )
    before = datetime.now(UTC)
    try:
        consumer = traces_consumer(declared, tier_settings, pool, handler)
        async with asyncio.timeout(20), consumer:
            run = asyncio.create_task(consumer.run())
            await wait_until(lambda: consumer.counters.deferred[TIER_S] >= 1)
            # The copy is counted once confirmed, and recorded in the ledger just after.
            row = None
            while row is None:
                row = await db.fetchrow(
                    "SELECT copies, since FROM parked_messages WHERE queue = $1", tier
                )
                await asyncio.sleep(0.02)
            await consumer.stop()
            await run
    finally:
        await pool.close()
    assert consumer.counters.deferred[TIER_S] == 1
    assert consumer.counters.retries == 0
    assert row is not None and row["copies"] == 1
    assert row["since"] >= before - timedelta(seconds=1)


class TestDeadLetterCommands:
    async def _park(self, settings, broker_connection, db, ids: list[str]) -> str:
        names = topology(settings)
        queue = names.dead_letter_queue(names.subscriptions_queue)
        channel = await broker_connection.channel()
        async with channel:
            await declare_topology(channel, settings)
        headers = {
            HEADER_DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
            "x-original-queue": names.subscriptions_queue,
        }
        channel = await broker_connection.channel(publisher_confirms=True)
        async with channel:
            for message_id in ids:
                message = aio_pika.Message(b"{}", headers=headers, message_id=message_id)
                await channel.default_exchange.publish(message, queue, mandatory=True, timeout=5)
        since = datetime.now(UTC) - timedelta(seconds=30)
        await db.executemany(
            "INSERT INTO parked_messages (queue, message_id, since) VALUES ($1, $2, $3)",
            [(queue, i, since) for i in ids],
        )
        return queue

    async def test_replay_and_purge_by_id_forget_what_they_removed(
        self, amqp_connection, settings, db
    ):
        """Each message replayed or purged by id takes its age with it; the others keep
        theirs."""
        queue = await self._park(settings, amqp_connection, db, ["a", "b", "c", "d"])
        outcome = await dlq.replay(settings, "subscriptions", ids=["b"])
        assert outcome.total == 1
        outcome = await dlq.purge(settings, "subscriptions", ids=["d"])
        assert outcome.total == 1
        assert await rows(db) == [(queue, "a", 1), (queue, "c", 1)]

    async def test_purge_all_forgets_the_queue(self, amqp_connection, settings, db):
        """``purge --all`` forgets every age of its queue, none of another queue's."""
        await self._park(settings, amqp_connection, db, ["a", "b"])
        other = topology(settings).dead_letter_queue(topology(settings).traces_queue)
        await db.execute(
            "INSERT INTO parked_messages (queue, message_id, since) VALUES ($1, 'x', now())", other
        )
        outcome = await dlq.purge(settings, "subscriptions", ids=None)
        assert outcome.total == 2
        assert await rows(db) == [(other, "x", 1)]
