"""RabbitMQ connections cut and restored (a broker restart, as the bridge sees it) while edrone
sends webhooks and the consumers work: every 200 is stored once, every 503 can be resent, and
the consumers come back by themselves (docs/design.md promises 1 and 2)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bridge.amqp import topology
from bridge.config import Settings
from bridge.ingress.app import create_app
from consumers.runtime import Consumer
from tests.support.consumers import ready_count, serve_subscriptions, wait_until
from tests.support.processes import (
    FAST_SUBSCRIPTIONS,
    Answers,
    check_ledger,
    history,
    report,
    send,
    through,
    unready,
    wait_for_count,
    wait_ready,
)
from tests.support.proxy import TcpProxy


class TestWebhooksThroughBrokerCuts:
    async def test_every_200_is_stored_once_and_every_503_lands_when_resent(
        self,
        make_settings: Callable[..., Settings],
        settings: Settings,
        amqp_proxy: TcpProxy,
        amqp_connection,
        db,
        aiohttp_client,
        consumers_made: list[Consumer],
        capsys,
    ):
        """5,000 webhooks while the broker connections of the ingress and of the subscription
        consumer are cut four times: each answer is a 200 or a 503; every 200'd event is in
        the inbox exactly once, every 503'd event lands once resent, the ledger holds the
        newest change of every address, and the work and dead-letter queues end empty."""
        proxied = make_settings(
            amqp_url=through(settings.amqp_url.get_secret_value(), amqp_proxy),
            publish_timeout_s=2.0,
            subscriptions=FAST_SUBSCRIPTIONS,
        )
        changes = history(5000, addresses=500, seed=1, tag="cut")
        client = await aiohttp_client(create_app(proxied))
        base = str(client.make_url("")).rstrip("/")
        url = base + proxied.webhook_path
        stopping = asyncio.Event()
        consuming = asyncio.create_task(
            serve_subscriptions(proxied, stopping, started=consumers_made.append)
        )
        first = Answers()
        cuts = 0

        async def cut_repeatedly() -> None:
            nonlocal cuts
            # Cuts while consuming, not while the consumer starts (a start that loses its
            # broker fails, for its process to be started again): with bundles the ingress
            # reaches 10 % of the webhooks before the consumer is up.
            await wait_until(lambda: bool(consumers_made) and consumers_made[0].ready, 30)
            for fraction in (0.1, 0.3, 0.5, 0.7):
                await wait_until(lambda f=fraction: first.done >= f * len(changes), 60)
                await amqp_proxy.cut()
                cuts += 1
                # Readiness follows the connection (what a load balancer watches).
                await wait_until(unready(base), 5)
                await asyncio.sleep(0.4)
                await amqp_proxy.restore()

        try:
            async with asyncio.timeout(90):
                await asyncio.gather(
                    send(url, changes, first, concurrency=50, backoff_s=0.2), cut_repeatedly()
                )
            counts = first.counts()
            assert set(counts) <= {"200", "503"}, counts
            await wait_ready(base)
            resent = Answers()
            for _ in range(5):
                answers = {**first.by_event, **resent.by_event}
                pending = [c for c in changes if answers[c.event_id] == "503"]
                if not pending:
                    break
                await send(url, pending, resent, concurrency=50)
            assert set(resent.counts()) <= {"200", "503"}
            stored = await wait_for_count(db, "SELECT count(*) FROM inbox", len(changes))
            check = await check_ledger(db, changes)
            names = topology(proxied)
            queue = names.subscriptions_queue
            depth = await ready_count(amqp_connection, queue)
            dead = await ready_count(amqp_connection, names.dead_letter_queue(queue))
        finally:
            stopping.set()
            async with asyncio.timeout(30):
                await consuming
        counters = consumers_made[0].counters
        report(
            capsys,
            "5,000 webhooks, broker cut 4x",
            sent=len(changes),
            cuts=cuts,
            ok_200=counts["200"],
            unavailable_503=counts["503"],
            resent=resent.done,
            resent_200=resent.counts()["200"],
            stored=stored,
            duplicates_absorbed=counters.skipped["duplicate"],
            redeliveries_dropped=counters.dropped,
            missing=len(check.missing),
            wrong_ledger_rows=len(check.wrong),
            queue_left=depth,
            dead_lettered=dead,
        )
        assert cuts == 4
        assert first.events("200") | resent.events("200") == {c.event_id for c in changes}
        assert check.ok, (check.missing[:5], check.unexpected[:5], check.wrong[:5])
        assert stored == len(changes)
        assert (depth, dead) == (0, 0)
