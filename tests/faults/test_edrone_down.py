"""edrone down for a while (answering 503, then refusing connections), then back: the trace
forwarder's breaker pauses without using up the retry tiers, and every shop change reaches
edrone once, none dead-lettered (docs/design.md promises 2 and 4)."""

from __future__ import annotations

import asyncio
from collections import Counter

from bridge.amqp import declare_trace_topology, topology
from tests.support.consumers import (
    publish_platform,
    ready_count,
    serve_traces,
    shop_event,
    wait_until,
)
from tests.support.processes import FAST_TRACES, accepted, report
from tests.support.proxy import TcpProxy

BREAKER = {"breaker_failures": 5, "breaker_initial_pause_s": 0.2, "breaker_max_pause_s": 0.5}


class TestEdroneDown:
    async def test_every_trace_is_delivered_once_after_an_outage(
        self, make_settings, amqp_connection, db, fake, consumers_made, capsys
    ):
        """500 shop changes while edrone answers 503 for a second and then refuses
        connections for a second: once it is back, each change got exactly one 200, nothing
        is dead-lettered, and the work queue and every retry tier end empty."""
        proxy = TcpProxy(fake.host, fake.port)
        await proxy.start()
        bridge = make_settings(
            trace_url=f"http://127.0.0.1:{proxy.port}/trace", traces={**FAST_TRACES, **BREAKER}
        )
        names = topology(bridge)
        channel = await amqp_connection.channel()
        async with channel:
            await declare_trace_topology(channel, bridge)
        emails = [f"down{n}@example.com" for n in range(500)]
        await publish_platform(amqp_connection, bridge, [shop_event(e) for e in emails])
        fake.faults.status = 503
        stopping = asyncio.Event()
        forwarding = asyncio.create_task(
            serve_traces(bridge, stopping, started=consumers_made.append)
        )
        try:
            await wait_until(lambda: len(fake.requests) >= 20, 10)
            await asyncio.sleep(1.0)  # edrone answering 503 for a while
            await proxy.cut()
            await asyncio.sleep(1.0)  # edrone unreachable for a while
            fake.faults.status = None
            await proxy.restore()
            await wait_until(lambda: len(accepted(fake)) >= len(emails), 30)
            queues = [names.traces_queue, *names.retry_queues(bridge.traces.retry_tiers_s)]

            async def drained() -> bool:
                counts = [await ready_count(amqp_connection, q) for q in queues]
                return not any(counts)

            await wait_until(drained, 10)
        finally:
            stopping.set()
            async with asyncio.timeout(30):
                await forwarding
            await proxy.close()
        dead = await ready_count(amqp_connection, names.dead_letter_queue(names.traces_queue))
        counters = consumers_made[0].counters
        answered = Counter(r.status for r in fake.requests)
        per_email = accepted(fake)
        report(
            capsys,
            "500 traces, edrone 503 then refusing",
            sent=len(emails),
            edrone_503=answered[503],
            requests=len(fake.requests),
            deferred_by_tier=dict(counters.deferred),
            acked_sent=counters.sent,
            delivered=len(per_email),
            requests_200=answered[200],
            duplicated=sum(1 for n in per_email.values() if n > 1),
            dead_lettered=dead,
        )
        assert answered[503] >= 20, "edrone's outage never reached the forwarder"
        assert set(per_email) == set(emails)
        assert set(per_email.values()) == {1}, "a trace was delivered more than once"
        assert dead == 0 and counters.dead_lettered == 0
