"""A copy the broker nacks moves, with every copy planned already, to a new channel before it is
sent again (bridge/publishing.py says why), and lands once the broker takes it. The nack comes
from what one node can give: the dead-letter routing key bound to a full classic queue that
rejects publishes."""

from __future__ import annotations

import asyncio

import aio_pika
import structlog

from bridge.amqp import topology
from consumers.copies import CopyChannel, publish_all
from consumers.outcomes import Reject
from consumers.spec import Counters
from tests.support.consumers import wait_until


async def test_nacked_copies_move_to_a_new_channel_and_land(settings, amqp_connection):
    names = topology(settings)
    work, dlq = names.subscriptions_queue, names.dead_letter_queue(names.subscriptions_queue)
    channel = await amqp_connection.channel()
    dlx = await channel.declare_exchange(
        names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    full = await channel.declare_queue(
        dlq, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    await full.bind(dlx, routing_key=dlq)
    source = await channel.declare_queue(work, durable=True)
    for n in range(3):
        await channel.default_exchange.publish(aio_pika.Message(f"m{n}".encode()), work)
    deliveries = [await source.get(timeout=5) for _ in range(3)]

    copies = CopyChannel(amqp_connection, names, work, [], timeout_s=5.0)
    await copies.open()
    first_channel = copies.channel
    planned = copies.planner.plan(deliveries, [Reject("bad")] * 3)
    landed: list[bytes] = []
    with structlog.testing.capture_logs() as logs:
        sending = asyncio.create_task(publish_all(planned, Counters(), 0.05, 0.2, copies.renew))
        # The queue takes one; the others are nacked, moved to a new channel, and sent again
        # until there is room: taking what landed makes room for one more.
        await wait_until(lambda: any(e["event"] == "copy_channel_renewed" for e in logs), 10)
        async with asyncio.timeout(20):
            while not sending.done() or len(landed) < 3:
                message = await full.get(no_ack=True, fail=False, timeout=5)
                if message is not None:
                    landed.append(message.body)
                await asyncio.sleep(0.1)
        parked = await sending
    assert len(parked) == 3
    assert sorted(landed) == [b"m0", b"m1", b"m2"]
    assert copies.channel is not first_channel and first_channel.is_closed
    for delivery in deliveries:
        await delivery.ack()
    await channel.queue_delete(dlq, if_unused=False, if_empty=False)
    await channel.queue_delete(work, if_unused=False, if_empty=False)
