"""Both consumers behind a RabbitMQ proxy that is cut and restored: they report themselves
unready while disconnected, come back consuming by themselves, and a consumer the broker
stopped delivering to behind aio-pika's back is registered again by the watchdog."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aio_pika
import pytest

from bridge.amqp import declare_topology, declare_trace_topology, topology
from bridge.broker import connect
from bridge.db import create_pool
from bridge.ingress.app import create_app
from consumers import subscriptions
from consumers.runtime import Consumer
from consumers.service import consumer_of
from tests.conftest import remove_amqp
from tests.support.consumers import (
    make_event,
    platform_message,
    publish,
    publish_platform,
    ready_count,
    running,
    serve_subscriptions,
    serve_traces,
    shop_event,
    trace_consumer,
    wait_until,
)
from tests.support.processes import (
    FAST_SUBSCRIPTIONS,
    FAST_TRACES,
    Answers,
    accepted,
    history,
    report,
    send,
    through,
    wait_for_count,
    wait_ready,
)


async def cut_and_restore(proxy, consumer: Consumer, rounds: int, seed: int) -> None:
    """Cut ``rounds`` times; each time wait for the consumer to notice, then restore after a
    random pause, sometimes right away, sometimes while aio-pika is still reconnecting."""
    rng = random.Random(seed)
    for _ in range(rounds):
        await proxy.cut()
        await wait_until(lambda: not consumer.ready, 5)
        await asyncio.sleep(rng.choice((0.0, 0.05, 0.3, 0.7)))
        await proxy.restore()
        await asyncio.sleep(rng.choice((0.0, 0.1, 0.6)))


@pytest.fixture
async def proxied(make_settings, settings, amqp_proxy):
    def make(**overrides):
        return make_settings(
            amqp_url=through(settings.amqp_url.get_secret_value(), amqp_proxy), **overrides
        )

    return make


class TestSubscriptionConsumer:
    async def test_consumes_again_after_repeated_cuts(
        self, proxied, settings, amqp_proxy, amqp_connection, db, capsys
    ):
        """Cut five times at random moments: ``ready`` is false while disconnected and true
        again once aio-pika restored the channel and consumer; the events published meanwhile
        and afterwards are all applied, once."""
        bridge = proxied(subscriptions=FAST_SUBSCRIPTIONS)
        connection = await connect(bridge, "test")
        pool = await create_pool(
            settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s
        )
        names = topology(bridge)
        try:
            channel = await connection.channel()
            async with channel:
                await declare_topology(channel, bridge)
            async with (
                consumer_of(subscriptions.PART, bridge, connection, pool) as consumer,
                consumer,
                running(consumer, timeout_s=60),
            ):
                assert consumer.ready
                first = [make_event(f"a{n}@example.com") for n in range(300)]
                await publish(amqp_connection, bridge, first)
                cuts = asyncio.create_task(cut_and_restore(amqp_proxy, consumer, 5, seed=3))
                second = [make_event(f"b{n}@example.com") for n in range(300)]
                await publish(amqp_connection, bridge, second)
                await cuts
                await wait_until(lambda: consumer.ready, 10)
                third = [make_event(f"c{n}@example.com") for n in range(300)]
                await publish(amqp_connection, bridge, third)
                stored = await wait_for_count(db, "SELECT count(*) FROM inbox", 900, 30)
                left = await ready_count(amqp_connection, names.subscriptions_queue)
        finally:
            await connection.close()
            await pool.close()
        report(
            capsys,
            "subscription consumer, broker cut 5x",
            sent=900,
            stored=stored,
            duplicates_absorbed=consumer.counters.skipped["duplicate"],
            redeliveries_dropped=consumer.counters.dropped,
            queue_left=left,
        )
        assert (stored, left) == (900, 0)

    async def test_watchdog_registers_a_lost_consumer_again(
        self, proxied, settings, amqp_connection, db
    ):
        """The broker stops delivering to the consumer while aio-pika still thinks it is
        registered (a restore that lost it): the watchdog notices, ``ready`` turns false, and
        the consumer is registered again and applies what was published meanwhile."""
        bridge = proxied(subscriptions=FAST_SUBSCRIPTIONS)
        connection = await connect(bridge, "test")
        pool = await create_pool(
            settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s
        )
        try:
            channel = await connection.channel()
            async with channel:
                await declare_topology(channel, bridge)
            async with (
                consumer_of(subscriptions.PART, bridge, connection, pool) as consumer,
                consumer,
                running(consumer, timeout_s=30),
            ):
                # Behind aio-pika's back (so through private attributes): cancel on the raw
                # channel, which leaves the consumer as a restore that lost it would.
                underlay = await consumer._channel.get_underlay_channel()
                await underlay.basic_cancel(consumer._consumer_tag)
                await wait_until(lambda: not consumer.ready, 5)
                await publish(
                    amqp_connection, bridge, [make_event(f"w{n}@x.com") for n in range(50)]
                )
                stored = await wait_for_count(db, "SELECT count(*) FROM inbox", 50, 10)
                assert consumer.ready
        finally:
            await connection.close()
            await pool.close()
        assert stored == 50


class TestTraceConsumer:
    async def test_forwards_again_after_repeated_cuts(
        self, proxied, settings, amqp_proxy, amqp_connection, db, fake, capsys
    ):
        """The trace forwarder's consumer, cut five times: every shop change published before,
        during and after the cuts reaches edrone with exactly one 200 (an ack lost in a cut
        brings a redelivery, which the recorded trace state turns into a no-op)."""
        bridge = proxied(trace_url=fake.url, traces=FAST_TRACES)
        direct = bridge.model_copy(update={"amqp_url": settings.amqp_url})
        channel = await amqp_connection.channel()
        async with channel:
            await declare_trace_topology(channel, direct)
        connection = await connect(bridge, "test")
        pool = await create_pool(
            settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s
        )
        try:
            async with (
                trace_consumer(connection, pool, bridge) as consumer,
                running(consumer, timeout_s=60),
            ):
                emails = [f"t{n}@example.com" for n in range(600)]
                await publish_platform(
                    amqp_connection, bridge, [shop_event(e) for e in emails[:300]]
                )
                await cut_and_restore(amqp_proxy, consumer, 5, seed=4)
                await wait_until(lambda: consumer.ready, 10)
                await publish_platform(
                    amqp_connection, bridge, [shop_event(e) for e in emails[300:]]
                )
                await wait_until(lambda: len(accepted(fake)) >= 600, 30)
        finally:
            await connection.close()
            await pool.close()
        per_email = accepted(fake)
        duplicated = sum(1 for n in per_email.values() if n > 1)
        report(
            capsys,
            "trace consumer, broker cut 5x",
            sent=600,
            delivered=len(per_email),
            requests_200=sum(per_email.values()),
            duplicated=duplicated,
            skipped=dict(consumer.counters.skipped),
            redeliveries_dropped=consumer.counters.dropped,
        )
        assert set(per_email) == set(emails)
        assert duplicated == 0


class TestTopologyRestore:
    async def test_every_process_declares_its_topology_again(
        self,
        proxied,
        settings,
        amqp_proxy,
        amqp_connection,
        db,
        fake,
        aiohttp_client,
        consumers_made,
        capsys,
    ):
        """The broker comes back without queues and exchanges: the ingress, the subscription
        consumer and the trace forwarder declare theirs again on reconnect, so webhooks are
        accepted and applied, and the shop's changes are forwarded, as before the outage."""
        bridge = proxied(trace_url=fake.url, subscriptions=FAST_SUBSCRIPTIONS, traces=FAST_TRACES)
        direct = bridge.model_copy(update={"amqp_url": settings.amqp_url})
        client = await aiohttp_client(create_app(bridge))
        stopping = asyncio.Event()
        parts = [
            asyncio.create_task(
                serve_subscriptions(bridge, stopping, started=consumers_made.append)
            ),
            asyncio.create_task(serve_traces(bridge, stopping, started=consumers_made.append)),
        ]
        url = str(client.make_url(bridge.webhook_path))
        try:
            before = history(50, addresses=50, seed=6, tag="before")
            answers = Answers()
            await send(url, before, answers)
            assert answers.counts() == {"200": 50}
            await wait_for_count(db, "SELECT count(*) FROM inbox", 50, 10)
            # The subscription consumer and both lanes of the trace forwarder.
            await wait_until(lambda: [c.ready for c in consumers_made] == [True] * 3, 10)
            await amqp_proxy.cut()
            # A broker that comes back without its definitions (a new node, a container
            # without its volume): every queue and exchange of the deployment is gone.
            await remove_amqp(direct)
            await amqp_proxy.restore()
            await wait_ready(str(client.make_url("")).rstrip("/"))
            after = history(200, addresses=200, seed=7, tag="after")
            await wait_until(self.all_accepted(url, after, answers), 30)
            stored = await wait_for_count(db, "SELECT count(*) FROM inbox", 250, 30)
            emails = [f"empty{n}@example.com" for n in range(100)]

            unrouted = [shop_event(e) for e in emails]

            async def all_routed() -> bool:
                """Publish what no queue took yet, mandatory: the forwarder declares the
                exchange before it binds its queue again, and an event in between is dropped."""
                channel = await amqp_connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                try:
                    async with channel:
                        exchange = await channel.get_exchange(direct.platform_exchange)
                        while unrouted:
                            await exchange.publish(
                                platform_message(unrouted[0]),
                                direct.platform_routing_key,
                                mandatory=True,
                                timeout=10,
                            )
                            unrouted.pop(0)
                except (aio_pika.exceptions.ChannelClosed, aio_pika.exceptions.DeliveryError):
                    return False
                return True

            await wait_until(all_routed, 30)
            await wait_until(lambda: len(accepted(fake)) >= 100, 30)
        finally:
            stopping.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*parts)
        report(
            capsys,
            "broker back empty",
            webhooks=250,
            stored=stored,
            traces_sent=len(emails),
            traces_200=sum(accepted(fake).values()),
        )
        assert stored == 250
        assert accepted(fake) == Counter({email: 1 for email in emails})

    @staticmethod
    def all_accepted(url, changes, answers):
        """Send whatever is not yet 200'd; true once all are (the ingress may still be
        declaring its topology again: a 503 until then)."""

        async def check() -> bool:
            pending = [c for c in changes if answers.by_event.get(c.event_id) != "200"]
            if pending:
                await send(url, pending, answers)
            return all(answers.by_event.get(c.event_id) == "200" for c in changes)

        return check
