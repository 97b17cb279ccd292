"""A consumer process's metrics: what it counted, what its monitor sampled, and its own
/metrics, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from bridge.amqp import topology
from bridge.metrics import Metrics, observability_app
from consumers import traces
from consumers.service import consumer_of
from tests.support.consumers import (
    make_event,
    publish,
    publish_platform,
    ready_count,
    serve_subscriptions,
    shop_event,
    wait_until,
)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"edrone_bridge_{name}", labels)


async def test_consumer_counts_and_samples(
    broker, db, make_consumer_settings, make_settings, settings
):
    """Outcomes are counted per queue, dead letters per queue, and the monitor samples depths,
    the dead-letter queue's oldest age (leaving the message there) and both connections."""
    fast = make_consumer_settings()
    monitored = make_settings(subscriptions=fast.subscriptions, monitor_interval_s=0.1)
    names = topology(monitored)
    dlq = names.dead_letter_queue(names.subscriptions_queue)
    first = make_event("a@example.com")
    await publish(broker, monitored, [first, first, make_event("b@example.com"), b"{broken"])
    metrics = Metrics()
    stopping = asyncio.Event()
    task = asyncio.create_task(serve_subscriptions(monitored, stopping, metrics=metrics))
    try:
        queue = names.subscriptions_queue

        def settled() -> bool:
            return (
                sample(metrics, "events_total", queue=queue, outcome="applied") == 2
                and sample(metrics, "queue_messages", queue=dlq) == 1
                and (sample(metrics, "queue_oldest_message_age_seconds", queue=dlq) or 0) > 0
            )

        await wait_until(settled, timeout_s=15)
        assert sample(metrics, "events_total", queue=queue, outcome="duplicate") == 1
        assert sample(metrics, "dead_lettered_total", queue=queue) == 1
        assert sample(metrics, "batch_size_count", queue=queue) >= 1
        assert sample(metrics, "queue_messages", queue=queue) == 0
        assert sample(metrics, "queue_consumers", queue=queue) == 1
        assert sample(metrics, "broker_connected") == 1
        assert sample(metrics, "database_connected") == 1
        assert await ready_count(broker, dlq) == 1  # peeking took nothing away
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)


async def test_a_trace_edrone_accepted_is_counted_as_sent(fake, make_traces, amqp_connection, pool):
    """A trace edrone answered 200 is the outcome ``sent``, never ``applied`` (an applied
    subscription change): in the counters, their summary and repr, and the events metric."""
    settings = await make_traces()
    await publish_platform(amqp_connection, settings, [shop_event()])
    metrics = Metrics()

    built = consumer_of(traces.PART, settings, amqp_connection, pool, metrics=metrics)
    async with built as consumer, consumer:
        await consumer.run(burst=True)

    queue = topology(settings).traces_queue
    assert (consumer.counters.sent, consumer.counters.applied) == (1, 0)
    assert consumer.counters.summary()["sent"] == 1
    assert "sent=1" in repr(consumer)
    assert sample(metrics, "events_total", queue=queue, outcome="sent") == 1
    assert sample(metrics, "events_total", queue=queue, outcome="applied") is None


async def test_observability_endpoints(aiohttp_client):
    """/metrics speaks Prometheus' text format; /readyz follows the readiness callable."""
    metrics = Metrics()
    metrics.events.labels("q", "applied").inc(3)
    ready = True
    client = await aiohttp_client(
        observability_app(metrics, lambda: None if ready else "not consuming")
    )
    text = await (await client.get("/metrics")).text()
    assert 'edrone_bridge_events_total{outcome="applied",queue="q"} 3.0' in text
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    ready = False
    assert (await client.get("/readyz")).status == 503


async def test_consumer_serves_its_metrics_port(db, make_consumer_settings, make_settings):
    """`consume subscriptions` answers /metrics on metrics_port while it runs."""
    port = _free_port()
    fast = make_consumer_settings()
    exposed = make_settings(subscriptions=fast.subscriptions, metrics_port=port)
    stopping = asyncio.Event()
    task = asyncio.create_task(serve_subscriptions(exposed, stopping))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

            async def answers() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(answers, timeout_s=15)
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert "edrone_bridge_broker_connected" in await response.text()
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
