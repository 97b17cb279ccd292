"""Bundles (several webhooks in one broker message, as the ingress publishes them under load)
through the real subscription consumer, broker and database: each webhook is applied, refused
and dead-lettered on its own, and a bundle the broker delivers again goes back as its webhooks."""

from __future__ import annotations

import json
import uuid

import aio_pika

from bridge import bundles
from bridge.amqp import ROUTING_KEY_BY_CHANNEL, topology
from bridge.app_config import AppConfig
from bridge.config import Settings
from bridge.headers import HEADER_ERROR
from bridge.metrics import Metrics
from tests.consumers.test_poison import REFUSING_TRIGGER
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import apply_burst, make_event, ready_count, take_all
from tests.support.shop_tables import MAGENTO_TARGET, magento


async def publish_bundle(
    connection: aio_pika.abc.AbstractConnection, settings: Settings, bodies: list[bytes]
) -> None:
    """One bundle, as the ingress publishes it: persistent, confirmed."""
    channel = await connection.channel(publisher_confirms=True)
    async with channel:
        exchange = await channel.get_exchange(topology(settings).webhook_exchange)
        message = aio_pika.Message(
            bundles.join(bodies),
            content_type=bundles.BUNDLE_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"bundle-{uuid.uuid4().hex}",
            headers={bundles.HEADER_BUNDLED: len(bodies)},
        )
        await exchange.publish(message, ROUTING_KEY_BY_CHANNEL["email"], timeout=10)


def bodies_of(events: list) -> list[bytes]:
    return [event.model_dump_json().encode() for event in events]


class TestBundles:
    async def test_every_webhook_of_a_bundle_is_applied(self, broker, pool, db, fast_settings):
        """Two bundles of 15 with batches of 20: a batch never ends inside a bundle (its ack
        would ack the parts left out), every webhook is applied once and both are acked."""
        events = [make_event(f"user{n}@example.com") for n in range(30)]
        await publish_bundle(broker, fast_settings, bodies_of(events[:15]))
        await publish_bundle(broker, fast_settings, bodies_of(events[15:]))

        consumer = await apply_burst(broker, pool, fast_settings)

        assert consumer.counters.applied == 30
        assert consumer.counters.batches == 1  # 20 would have cut the second bundle
        inbox = {row["event_id"] for row in await db.fetch("SELECT event_id FROM inbox")}
        assert inbox == {event.event_id for event in events}
        queue = topology(fast_settings).subscriptions_queue
        assert await ready_count(broker, queue) == 0  # acked: nothing came back at the close

    async def test_an_invalid_webhook_in_a_bundle_is_dead_lettered_alone(
        self, broker, pool, db, fast_settings
    ):
        """A part that is no valid message goes to the dead-letter queue as a message of its
        own (its own body and event_id), and the bundle's other webhooks are applied."""
        good = [make_event(f"user{n}@example.com") for n in range(4)]
        bad = json.dumps({"event_id": "evt-bad", "app_id": TEST_APP_ID}).encode()
        await publish_bundle(
            broker, fast_settings, [*bodies_of(good[:2]), bad, *bodies_of(good[2:])]
        )

        consumer = await apply_burst(broker, pool, fast_settings)

        assert (consumer.counters.applied, consumer.counters.dead_lettered) == (4, 1)
        names = topology(fast_settings)
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert dead.body == bad
        assert dead.content_type == "application/json"
        assert bundles.HEADER_BUNDLED not in dead.headers
        assert "invalid message" in dead.headers[HEADER_ERROR]
        assert await db.fetchval("SELECT count(*) FROM inbox") == 4

    async def test_a_webhook_that_fails_its_batch_is_isolated_within_its_bundle(
        self, broker, db, pool, make_consumer_settings
    ):
        """The shop's table refuses one address of a bundle of 10: the batch is split down to
        it; it alone is dead-lettered, with PostgreSQL's error, and the 9 are applied."""
        await magento(db)
        await db.execute(REFUSING_TRIGGER)
        target = {**MAGENTO_TARGET, "create_missing": True}
        settings = make_consumer_settings(
            apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=target)}
        )
        good = [make_event(f"user{n}@example.com") for n in range(9)]
        poison = make_event("poison@example.com")
        await publish_bundle(broker, settings, bodies_of([*good[:5], poison, *good[5:]]))

        consumer = await apply_burst(broker, pool, settings)

        counters = consumer.counters
        assert (counters.applied, counters.dead_lettered, counters.isolated) == (9, 1, 1)
        names = topology(settings)
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert json.loads(dead.body)["event_id"] == poison.event_id
        assert "the shop refuses poison@example.com" in dead.headers[HEADER_ERROR]
        ledger = {row["address"] for row in await db.fetch("SELECT address FROM subscribers")}
        assert ledger == {event.address for event in good}

    async def test_a_redelivered_bundle_goes_back_as_its_webhooks(
        self, broker, pool, db, fast_settings
    ):
        """A bundle delivered and not acked (a consumer that died) comes again: its webhooks
        go back to the queue one message each, without the bundle's delivery count, so that
        from then on the delivery limit counts each webhook's own deliveries; then each is
        applied once."""
        events = [make_event(f"user{n}@example.com") for n in range(5)]
        await publish_bundle(broker, fast_settings, bodies_of(events))
        queue_name = topology(fast_settings).subscriptions_queue
        channel = await broker.channel()
        queue = await channel.get_queue(queue_name)
        taken = await queue.get(no_ack=False, timeout=5)
        assert bundles.is_bundle(taken.content_type)
        await channel.close()  # unacked: the broker delivers it again, redelivered

        metrics = Metrics()
        consumer = await apply_burst(broker, pool, fast_settings, metrics=metrics)

        assert consumer.counters.alone == 5
        resent = metrics.registry.get_sample_value(
            "edrone_bridge_bundle_parts_resent_total", {"queue": queue_name}
        )
        assert resent == 5
        assert consumer.counters.applied == 5
        inbox = {row["event_id"] for row in await db.fetch("SELECT event_id FROM inbox")}
        assert inbox == {event.event_id for event in events}
        assert await ready_count(broker, queue_name) == 0
