"""The ingress's group commit against the real broker: a webhook that finds a free slot goes
alone; those that come while every slot waits for its confirm go together, as one message, and
each is answered only with that message's confirm."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest

from bridge import bundles
from bridge.amqp import ROUTING_KEY_BY_CHANNEL, declare_topology
from bridge.broker import connect
from bridge.config import Settings
from bridge.ingress.bundler import Bundler
from bridge.publishing import ConfirmedPublisher, PublishFailed
from tests.support.proxy import TcpProxy
from tests.support.webhooks import queued, webhooks_in

EMAIL = ROUTING_KEY_BY_CHANNEL["email"]
SMS = ROUTING_KEY_BY_CHANNEL["sms"]


def body(event_id: str) -> bytes:
    return json.dumps({"event_id": event_id}).encode()


async def open_publisher(
    connection: aio_pika.abc.AbstractConnection, settings: Settings, timeout_s: float = 5.0
) -> ConfirmedPublisher:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await declare_topology(channel, settings)
    return ConfirmedPublisher(channel, exchange, timeout_s, on_return_raises=True)


@pytest.fixture
async def publisher(
    amqp_connection: aio_pika.abc.AbstractConnection, settings: Settings
) -> ConfirmedPublisher:
    return await open_publisher(amqp_connection, settings)


class TestBundler:
    async def test_a_webhook_with_a_free_slot_goes_alone(
        self, publisher, settings, amqp_connection
    ):
        """One at a time, each webhook is the message it always was: JSON, its event_id."""
        confirmed: list[int] = []
        bundler = Bundler(
            publisher, max_webhooks=50, in_flight=4, timeout_s=5.0, on_confirmed=confirmed.append
        )
        for n in range(3):
            await bundler.publish(body(f"evt-{n}"), routing_key=EMAIL, event_id=f"evt-{n}")
        messages = await queued(settings, amqp_connection)
        assert [m.message_id for m in messages] == ["evt-0", "evt-1", "evt-2"]
        assert {m.content_type for m in messages} == {"application/json"}
        assert [m.body for m in messages] == [body(f"evt-{n}") for n in range(3)]
        assert confirmed == [1, 1, 1]

    async def test_webhooks_that_come_while_the_slots_wait_share_a_message(
        self, publisher, settings, amqp_connection
    ):
        """60 at once with one slot: the first goes alone, the rest in bundles of at most 25,
        each webhook exactly once, every bundle's header counting its webhooks."""
        confirmed: list[int] = []
        bundler = Bundler(
            publisher, max_webhooks=25, in_flight=1, timeout_s=5.0, on_confirmed=confirmed.append
        )
        ids = [f"evt-{n}" for n in range(60)]
        await asyncio.gather(
            *(bundler.publish(body(i), routing_key=EMAIL, event_id=i) for i in ids)
        )
        messages = await queued(settings, amqp_connection)
        sent = [webhook for message in messages for webhook in webhooks_in(message)]
        assert sorted(sent) == sorted(body(i) for i in ids)
        bundled = [m for m in messages if bundles.is_bundle(m.content_type)]
        assert len(messages) < 10 and bundled
        assert all(1 < m.headers[bundles.HEADER_BUNDLED] <= 25 for m in bundled)
        assert all(m.headers[bundles.HEADER_BUNDLED] == len(webhooks_in(m)) for m in bundled)
        assert len({m.message_id for m in messages}) == len(messages)
        assert sorted(confirmed) == sorted(len(webhooks_in(m)) for m in messages)

    async def test_each_routing_key_gets_its_own_bundles(
        self, publisher, settings, amqp_connection
    ):
        """E-mail and SMS changes that come together still go to their own routing keys."""
        bundler = Bundler(publisher, max_webhooks=50, in_flight=1, timeout_s=5.0)
        keys = {f"evt-{n}": EMAIL if n % 2 else SMS for n in range(40)}
        await asyncio.gather(
            *(bundler.publish(body(i), routing_key=key, event_id=i) for i, key in keys.items())
        )
        messages = await queued(settings, amqp_connection)
        for message in messages:
            for webhook in webhooks_in(message):
                assert keys[json.loads(webhook)["event_id"]] == message.routing_key
        assert sum(len(webhooks_in(m)) for m in messages) == 40

    async def test_an_event_id_already_pending_is_published_once(
        self, publisher, settings, amqp_connection
    ):
        """edrone retrying a webhook still waiting for its confirm: both callers wait for the
        one publish; once answered, the same event_id is published again."""
        bundler = Bundler(publisher, max_webhooks=50, in_flight=1, timeout_s=5.0)
        await asyncio.gather(
            *(bundler.publish(body(i), routing_key=EMAIL, event_id=i) for i in ["a", "b", "b", "a"])
        )
        first = [w for m in await queued(settings, amqp_connection) for w in webhooks_in(m)]
        assert sorted(first) == [body("a"), body("b")]
        await bundler.publish(body("a"), routing_key=EMAIL, event_id="a")
        assert [m.body for m in await queued(settings, amqp_connection)] == [body("a")]

    async def test_a_caller_that_gives_up_leaves_its_bundle_to_the_others(
        self, publisher, settings, amqp_connection
    ):
        """A webhook whose caller is cancelled (its client gone) while it waits in a bundle:
        the others of the bundle are still confirmed, and it is published with them."""
        bundler = Bundler(publisher, max_webhooks=50, in_flight=1, timeout_s=5.0)
        ids = [f"evt-{n}" for n in range(4)]
        tasks = [
            asyncio.ensure_future(bundler.publish(body(i), routing_key=EMAIL, event_id=i))
            for i in ids
        ]
        await asyncio.sleep(0)  # all four in one bundle, sending
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert [results[n] for n in (0, 2, 3)] == [None, None, None]
        sent = [w for m in await queued(settings, amqp_connection) for w in webhooks_in(m)]
        assert sorted(sent) == sorted(body(i) for i in ids)

    async def test_an_unconfirmed_bundle_fails_each_of_its_webhooks(
        self, publisher, settings, amqp_connection
    ):
        """A bundle the broker does not take (unroutable here): every webhook in it fails,
        none is stored, and the next webhook goes on as usual."""
        confirmed: list[int] = []
        bundler = Bundler(
            publisher, max_webhooks=50, in_flight=1, timeout_s=5.0, on_confirmed=confirmed.append
        )
        results = await asyncio.gather(
            *(
                bundler.publish(body(f"x{n}"), routing_key="nowhere", event_id=f"x{n}")
                for n in range(10)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(r, PublishFailed) for r in results), results
        assert confirmed == []  # counted only once confirmed
        await bundler.publish(body("ok"), routing_key=EMAIL, event_id="ok")
        assert [m.body for m in await queued(settings, amqp_connection)] == [body("ok")]
        assert confirmed == [1]


class TestBundlerWithAStalledBroker:
    @pytest.fixture
    async def stalled(self, make_settings, settings) -> AsyncIterator[tuple[Bundler, TcpProxy]]:
        target = urlsplit(settings.amqp_url.get_secret_value())
        proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
        port = await proxy.start()
        proxied = make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/")
        connection = await connect(proxied, "test-bundler")
        try:
            publisher = await open_publisher(connection, proxied, timeout_s=1.0)
            yield Bundler(publisher, max_webhooks=50, in_flight=1, timeout_s=0.3), proxy
        finally:
            proxy.resume()
            await asyncio.wait_for(connection.close(), 10)
            await proxy.close()

    async def test_a_bundle_left_waiting_fails_unsent(self, stalled, settings, amqp_connection):
        """The broker stops answering: the webhook in the slot times out after the publish
        timeout, and those that waited behind it past the bundler's bound fail unsent then,
        not a whole publish timeout later."""
        bundler, proxy = stalled
        proxy.stall()
        started = time.monotonic()
        first = asyncio.ensure_future(bundler.publish(body("s0"), routing_key=EMAIL, event_id="s0"))
        await asyncio.sleep(0.05)  # sent: the only slot waits for its confirm
        results = await asyncio.gather(
            first,
            *(
                bundler.publish(body(f"s{n}"), routing_key=EMAIL, event_id=f"s{n}")
                for n in range(1, 5)
            ),
            return_exceptions=True,
        )
        took_s = time.monotonic() - started
        assert all(isinstance(r, PublishFailed) for r in results), results
        assert results[0].timed_out
        assert all("not sent within 0.3s" in str(r) for r in results[1:]), results
        assert 0.9 < took_s < 1.8
