"""A publisher whose message is nacked moves to a new channel (tests/faults/test_cluster.py
shows why: on RabbitMQ 3.10 a channel opened while a quorum queue had no leader goes on
nacking after a new one is elected). Here the broker nacks for a reason one node can give: a
full queue that rejects publishes."""

from __future__ import annotations

import asyncio

import pytest

from bridge.publishing import RENEW_INTERVAL_S, ConfirmedPublisher, PublishFailed
from tests.support.consumers import wait_until


async def test_a_nack_moves_the_publisher_to_a_new_channel_at_most_once_an_interval(
    settings, amqp_connection
):
    queue_name = f"{settings.amqp_prefix}.full"
    channel = await amqp_connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(
        queue_name,
        durable=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    publisher = ConfirmedPublisher(
        channel, channel.default_exchange, 5.0, connection=amqp_connection
    )
    try:
        await publisher.publish(b"{}", routing_key=queue_name, message_id="first")
        # Three nacks within the interval (the queue is full): one move.
        for attempt in range(3):
            with pytest.raises(PublishFailed) as refused:
                await publisher.publish(b"{}", routing_key=queue_name, message_id=f"n{attempt}")
            assert refused.value.refused == "nacked"
        await wait_until(lambda: publisher.renewals == 1, 5)
        assert publisher.ready and not channel.is_closed  # the old one closes after its publishes
        await queue.purge()
        await publisher.publish(b"{}", routing_key=queue_name, message_id="after")
        # A nack after the interval moves it again.
        await asyncio.sleep(RENEW_INTERVAL_S)
        with pytest.raises(PublishFailed):
            await publisher.publish(b"{}", routing_key=queue_name, message_id="later")
        await wait_until(lambda: publisher.renewals == 2, 5)
        await wait_until(lambda: channel.is_closed, 10)
    finally:
        cleanup = await amqp_connection.channel()
        await cleanup.queue_delete(queue_name, if_unused=False, if_empty=False)


async def test_without_its_connection_a_publisher_keeps_its_channel(settings, amqp_connection):
    queue_name = f"{settings.amqp_prefix}.full"
    channel = await amqp_connection.channel(publisher_confirms=True)
    await channel.declare_queue(
        queue_name,
        durable=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    publisher = ConfirmedPublisher(channel, channel.default_exchange, 5.0)
    try:
        await publisher.publish(b"{}", routing_key=queue_name, message_id="first")
        with pytest.raises(PublishFailed) as refused:
            await publisher.publish(b"{}", routing_key=queue_name, message_id="nacked")
        assert refused.value.refused == "nacked"
        await asyncio.sleep(RENEW_INTERVAL_S)
        assert publisher.renewals == 0 and not channel.is_closed
    finally:
        cleanup = await amqp_connection.channel()
        await cleanup.queue_delete(queue_name, if_unused=False, if_empty=False)
