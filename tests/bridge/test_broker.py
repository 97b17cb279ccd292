"""Connecting to one of several brokers, against the real RabbitMQ behind TCP proxies that
stand for a cluster's nodes: a node that does not answer is left for the next, on the first
connect and on every reconnect, and each node taken is logged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest
import structlog

from bridge.broker import connect
from bridge.starting import ServiceUnreachable
from tests.support.cli import closed_port
from tests.support.consumers import wait_until
from tests.support.proxy import TcpProxy


@pytest.fixture
async def nodes(settings) -> AsyncIterator[list[TcpProxy]]:
    """Three "nodes": proxies to the test's broker, each cut on its own."""
    target = urlsplit(settings.amqp_url.get_secret_value())
    proxies = [TcpProxy(target.hostname or "127.0.0.1", target.port or 5672) for _ in range(3)]
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.close()


def url_of(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/"


async def test_a_node_down_at_start_is_left_for_the_next(make_settings):
    down = closed_port()
    settings = make_settings(
        amqp_url=f"{url_of(down)},{url_of(5672)}",
        amqp_node_order="given",
        amqp_connect_attempts=2,
        amqp_connect_delay_s=0,
    )
    with structlog.testing.capture_logs() as logs:
        connection = await connect(settings, "test")
    async with connection:
        assert connection.node == "127.0.0.1:5672"
    failed = [e for e in logs if e["event"] == "amqp_connect_failed"]
    connected = [e for e in logs if e["event"] == "amqp_connected"]
    assert [e["node"] for e in failed] == [f"127.0.0.1:{down}"]
    assert [(e["node"], e["reconnected"]) for e in connected] == [("127.0.0.1:5672", False)]


async def test_every_node_down_names_them_all(make_settings):
    ports = [closed_port(), closed_port()]
    settings = make_settings(
        amqp_url=",".join(url_of(port) for port in ports),
        amqp_connect_attempts=2,
        amqp_connect_delay_s=0,
    )
    with pytest.raises(ServiceUnreachable) as failed:
        await connect(settings, "test")
    message = str(failed.value)
    assert f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}" in message
    assert "EDRONE_BRIDGE_AMQP_URL" in message and "guest" not in message


async def test_reconnects_go_round_the_nodes_and_consumers_come_back(make_settings, nodes):
    """The node in use dies, and so does the next: the connection goes round to the third, its
    consumer is restored there, and a message published afterwards reaches it."""
    settings = make_settings(
        amqp_url=",".join(url_of(proxy.port) for proxy in nodes),
        amqp_node_order="given",
        amqp_reconnect_interval_s=0.1,
    )
    queue_name = f"{settings.amqp_prefix}.broker-test"
    received: list[bytes] = []
    with structlog.testing.capture_logs() as logs:
        connection = await connect(settings, "test")
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, durable=True)

            async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    received.append(message.body)

            await queue.consume(take)
            assert connection.node == f"127.0.0.1:{nodes[0].port}"
            await nodes[1].cut()  # the next node is down too: it must be passed over
            await nodes[0].cut()
            await wait_until(lambda: connection.node == f"127.0.0.1:{nodes[2].port}", 10)
            await wait_until(lambda: connection.connected.is_set(), 10)
            # The channel and its consumer are restored after the reconnect itself: publish
            # until the consumer takes one (a publish on the channel not yet reopened fails).
            for attempt in range(50):
                with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
                    await channel.default_exchange.publish(
                        aio_pika.Message(f"after {attempt}".encode()), queue_name, timeout=5
                    )
                await asyncio.sleep(0.1)
                if received:
                    break
            await channel.queue_delete(queue_name, if_unused=False, if_empty=False)
        finally:
            await asyncio.wait_for(connection.close(), 10)
    assert received, "no message reached the consumer after the reconnect"
    reconnected = [e["node"] for e in logs if e["event"] == "amqp_connected" and e["reconnected"]]
    assert f"127.0.0.1:{nodes[2].port}" in reconnected
    assert f"127.0.0.1:{nodes[1].port}" not in reconnected
