"""SIGTERM to each process of the bridge in the middle of a load, run as operators run it
(``python -m bridge ...``): it stops taking work, finishes and acks what it holds within its
grace period and exits 0; nothing is lost and, after a restart, nothing is applied twice."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest

from bridge.amqp import declare_topology, declare_trace_topology, topology
from bridge.ingress.app import create_app
from tests.support.consumers import (
    make_event,
    publish,
    publish_platform,
    ready_count,
    serve_subscriptions,
    shop_event,
    wait_until,
)
from tests.support.processes import (
    FAST_TRACES,
    Answers,
    BridgeProcess,
    accepted,
    bridge_env,
    check_ledger,
    free_port,
    history,
    report,
    send,
    through,
    unready,
    wait_for_count,
    wait_ready,
)

INBOX = "SELECT count(*) FROM inbox"


def events_of(process: BridgeProcess) -> list[str]:
    return [event.get("event", "") for event in process.log_events()]


async def settled(connection, queues: list[str], target: int, held: int) -> int:
    """Messages ready in ``queues`` once ``held`` plus them reach ``target`` (the broker
    requeues a closed channel's unacked messages a moment after the process exits)."""
    counts: list[int] = []

    async def reached() -> bool:
        counts[:] = [await ready_count(connection, queue) for queue in queues]
        return held + sum(counts) >= target

    with contextlib.suppress(TimeoutError):
        await wait_until(reached, 10)
    return sum(counts)


class TestIngress:
    @pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
    async def test_no_200_for_an_event_not_stored(
        self, workers, settings, amqp_connection, db, aiohttp_client, tmp_path, capsys
    ):
        """SIGTERM to ``python -m bridge ingress`` (one process, or the first of two workers
        sharing the port, which passes the stop on) in the middle of 3,000 webhooks: it exits 0;
        every answer is a 200, a 503 or a connection error, never another status; every 200'd
        event is stored once a consumer drains the queue; and every other event, resent to a
        fresh ingress, lands too: each of the 3,000 is in the inbox exactly once."""
        port = free_port()
        ingress = BridgeProcess(
            tmp_path / "ingress.log",
            "ingress",
            env=bridge_env(
                settings,
                EDRONE_BRIDGE_HTTP_PORT=str(port),
                EDRONE_BRIDGE_SHUTDOWN_TIMEOUT_S="5",
                EDRONE_BRIDGE_INGRESS_WORKERS=str(workers),
            ),
        )
        base = f"http://127.0.0.1:{port}"
        changes = history(3000, addresses=300, seed=4, tag="term")
        first = Answers()
        await ingress.start()
        try:
            await wait_ready(base, 30)

            async def terminate_midway() -> int:
                await wait_until(lambda: first.done >= 1000, 60)
                return await ingress.terminate(30)

            _, code = await asyncio.gather(
                send(base + settings.webhook_path, changes, first, concurrency=50),
                terminate_midway(),
            )
        finally:
            await ingress.kill()
        counts = first.counts()
        ok = first.events("200")
        stopping = asyncio.Event()
        consuming = asyncio.create_task(serve_subscriptions(settings, stopping))
        try:
            stored_200 = await wait_for_count(
                db, "SELECT count(*) FROM inbox WHERE event_id = ANY($1)", len(ok), args=[list(ok)]
            )
            stored_first = await db.fetchval(INBOX)
            client = await aiohttp_client(create_app(settings))
            resent = Answers()
            pending = [c for c in changes if c.event_id not in ok]
            await send(str(client.make_url(settings.webhook_path)), pending, resent)
            stored = await wait_for_count(db, INBOX, len(changes))
        finally:
            stopping.set()
            async with asyncio.timeout(30):
                await consuming
        check = await check_ledger(db, changes)
        report(
            capsys,
            f"ingress ({workers} process(es)) SIGTERM mid-load",
            sent=len(changes),
            exit_code=code,
            ok_200=counts["200"],
            unavailable_503=counts["503"],
            connection_errors=sum(n for k, n in counts.items() if not k.isdigit()),
            ok_200_stored=stored_200,
            stored_without_200=stored_first - stored_200,
            resent=len(pending),
            resent_200=resent.counts()["200"],
            stored=stored,
            missing=len(check.missing),
            wrong_ledger_rows=len(check.wrong),
        )
        assert code == 0, ingress.log_tail()
        assert "ingress_stopping" in events_of(ingress)
        assert all(k in ("200", "503") or not k.isdigit() for k in counts), counts
        assert len(ok) < len(changes), "the ingress stopped after the load, not during it"
        assert stored_200 == len(ok), "a 200 was answered for an event that is not stored"
        assert set(resent.counts()) == {"200"}
        assert stored == len(changes) and check.ok, (check.missing[:5], check.wrong[:5])


class TestSubscriptionConsumer:
    @pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
    async def test_drains_on_a_stop_signal_and_a_restart_applies_the_rest(
        self, signal_number, settings, amqp_connection, db, tmp_path, capsys
    ):
        """SIGTERM (or SIGINT) to ``consume subscriptions`` in the middle of a 3,000-event
        backlog: it exits 0 with its drain inside the grace period, and at that moment every
        event is either applied and acked or back in the queue, never both; a restarted
        consumer applies the rest; each event is in the inbox once and the ledger is right."""
        changes = history(3000, addresses=300, seed=5, tag="drain")
        channel = await amqp_connection.channel()
        async with channel:
            await declare_topology(channel, settings)
        await publish(
            amqp_connection,
            settings,
            [
                make_event(c.address, status=c.status, at=c.event_date, event_id=c.event_id)
                for c in changes
            ],
        )
        env = bridge_env(
            settings,
            EDRONE_BRIDGE_METRICS_PORT="0",
            EDRONE_BRIDGE_SUBSCRIPTIONS__BATCH_SIZE="100",
            EDRONE_BRIDGE_SUBSCRIPTIONS__PREFETCH="300",
            EDRONE_BRIDGE_SUBSCRIPTIONS__DRAIN_TIMEOUT_S="10",
        )
        queue = topology(settings).subscriptions_queue
        first = BridgeProcess(tmp_path / "first.log", "consume", "subscriptions", env=env)
        second = BridgeProcess(tmp_path / "second.log", "consume", "subscriptions", env=env)
        try:
            await first.start()
            await wait_for_count(db, INBOX, 600, 30)
            first_code = await first.terminate(30, signal_number=signal_number)
            stored_at_stop = await db.fetchval(INBOX)
            left_at_stop = await settled(amqp_connection, [queue], len(changes), stored_at_stop)
            await second.start()
            stored = await wait_for_count(db, INBOX, len(changes), 60)
            second_code = await second.terminate(30)
        finally:
            await first.kill()
            await second.kill()
        left = await ready_count(amqp_connection, queue)
        dead = await ready_count(amqp_connection, topology(settings).dead_letter_queue(queue))
        check = await check_ledger(db, changes)
        report(
            capsys,
            f"consume subscriptions {signal_number.name} mid-backlog",
            sent=len(changes),
            exit_codes=(first_code, second_code),
            stored_at_stop=stored_at_stop,
            requeued_at_stop=left_at_stop,
            committed_not_acked=stored_at_stop + left_at_stop - len(changes),
            stored=stored,
            missing=len(check.missing),
            wrong_ledger_rows=len(check.wrong),
            queue_left=left,
            dead_lettered=dead,
        )
        assert (first_code, second_code) == (0, 0), first.log_tail()
        assert "consumer_drain_timeout" not in events_of(first)
        assert 0 < stored_at_stop < len(changes), "the stop came before or after the backlog"
        assert stored_at_stop + left_at_stop == len(changes)
        assert stored == len(changes) and check.ok, (check.missing[:5], check.wrong[:5])
        assert (left, dead) == (0, 0)


class TestTraceConsumer:
    async def run_with_stop(
        self, make_settings, amqp_connection, fake, tmp_path, *, drain_s, stop_after
    ):
        """1,000 shop changes; ``consume traces`` stopped by SIGTERM once ``stop_after``
        requests reached edrone, then started again (edrone answering at once) until every
        change got a 200. Returns what a test asserts on."""
        settings = make_settings(trace_url=fake.url, traces=FAST_TRACES)
        names = topology(settings)
        channel = await amqp_connection.channel()
        async with channel:
            await declare_trace_topology(channel, settings)
        emails = [f"stop{n}@example.com" for n in range(1000)]
        await publish_platform(amqp_connection, settings, [shop_event(e) for e in emails])
        env = bridge_env(
            settings,
            EDRONE_BRIDGE_TRACE_URL=fake.url,
            EDRONE_BRIDGE_METRICS_PORT="0",
            EDRONE_BRIDGE_TRACES__RETRY_TIERS_S="[0.2, 0.5, 1.0]",
            EDRONE_BRIDGE_TRACES__BATCH_SIZE="50",
            EDRONE_BRIDGE_TRACES__PREFETCH="100",
            EDRONE_BRIDGE_TRACES__CONCURRENCY="20",
            EDRONE_BRIDGE_TRACES__RATE_LIMIT_PER_S="0",
            EDRONE_BRIDGE_TRACES__DRAIN_TIMEOUT_S=str(drain_s),
        )
        queues = [names.traces_queue, *names.retry_queues(settings.traces.retry_tiers_s)]
        first = BridgeProcess(tmp_path / "first.log", "consume", "traces", env=env)
        second = BridgeProcess(tmp_path / "second.log", "consume", "traces", env=env)
        try:
            await first.start()
            await wait_until(lambda: len(fake.requests) >= stop_after, 30)
            first_code = await first.terminate(30)
            fake.faults.latency_ms = 0
            sent_first_run = {r.form["email"] for r in fake.requests}
            delivered_at_stop = len(accepted(fake))
            left_at_stop = await settled(amqp_connection, queues, len(emails), delivered_at_stop)
            await second.start()
            await wait_until(lambda: len(accepted(fake)) >= len(emails), 30)
            await wait_until(self.drained(amqp_connection, queues), 10)
            second_code = await second.terminate(30)
        finally:
            await first.kill()
            await second.kill()
        dead = await ready_count(amqp_connection, names.dead_letter_queue(names.traces_queue))
        per_email = accepted(fake)
        return {
            "emails": emails,
            "first": first,
            "codes": (first_code, second_code),
            "delivered_at_stop": delivered_at_stop,
            "requeued_at_stop": left_at_stop,
            "sent_first_run": sent_first_run,
            "per_email": per_email,
            "duplicated": {e for e, n in per_email.items() if n > 1},
            "dead": dead,
        }

    @staticmethod
    def drained(connection, queues):
        async def check() -> bool:
            return not any([await ready_count(connection, q) for q in queues])

        return check

    def report(self, capsys, name, run) -> None:
        report(
            capsys,
            name,
            sent=len(run["emails"]),
            exit_codes=run["codes"],
            delivered_at_stop=run["delivered_at_stop"],
            requeued_at_stop=run["requeued_at_stop"],
            delivered=len(run["per_email"]),
            requests_200=sum(run["per_email"].values()),
            duplicated=len(run["duplicated"]),
            dead_lettered=run["dead"],
        )

    async def test_drain_within_grace_sends_each_trace_once(
        self, make_settings, amqp_connection, db, fake, tmp_path, capsys
    ):
        """SIGTERM to ``consume traces`` in the middle of 1,000 shop changes (edrone answering
        in 20 ms): the batch in flight finishes, is recorded and acked, and the process exits
        0 inside its grace period; at that moment every change is either delivered or back in
        the queue; after a restart each change got exactly one 200 and none is dead-lettered.
        The trace path is at-least-once (see the next test); with the drain finishing in time,
        as here, nothing is sent twice."""
        fake.faults.latency_ms = 20
        run = await self.run_with_stop(
            make_settings, amqp_connection, fake, tmp_path, drain_s=10, stop_after=200
        )
        self.report(capsys, "consume traces SIGTERM, drain in time", run)
        assert run["codes"] == (0, 0), run["first"].log_tail()
        assert "consumer_drain_timeout" not in events_of(run["first"])
        assert run["delivered_at_stop"] + run["requeued_at_stop"] == len(run["emails"])
        assert set(run["per_email"]) == set(run["emails"])
        assert not run["duplicated"]
        assert run["dead"] == 0

    async def test_drain_cut_short_sends_again_only_what_was_in_flight(
        self, make_settings, amqp_connection, db, fake, tmp_path, capsys
    ):
        """edrone so slow (1 s per answer) that the 0.3 s drain runs out: the process still
        exits 0, leaving its batch in flight unacked; after a restart that batch is sent again.
        At-least-once, honestly counted: every change reaches edrone, and the only ones that
        reach it twice were in flight at the stop (at most one batch), none dead-lettered."""
        fake.faults.latency_ms = 1000
        run = await self.run_with_stop(
            make_settings, amqp_connection, fake, tmp_path, drain_s=0.3, stop_after=20
        )
        self.report(capsys, "consume traces SIGTERM, drain cut short", run)
        assert run["codes"] == (0, 0), run["first"].log_tail()
        assert "consumer_drain_timeout" in events_of(run["first"])
        assert set(run["per_email"]) == set(run["emails"])
        assert run["duplicated"] <= run["sent_first_run"]
        assert len(run["duplicated"]) <= 50  # one batch
        assert run["dead"] == 0


class TestDuringBrokerOutage:
    @pytest.mark.parametrize(
        "command",
        [("ingress",), ("consume", "subscriptions"), ("consume", "traces")],
        ids=["ingress", "subscriptions", "traces"],
    )
    async def test_sigterm_while_the_broker_is_unreachable(
        self, command, settings, amqp_proxy, db, tmp_path, capsys
    ):
        """With RabbitMQ unreachable, each process turns unready (/readyz 503) and SIGTERM
        still ends it, exit 0, well inside its grace period: nothing waits for a broker that
        may not come back before the container is killed."""
        port = free_port()
        process = BridgeProcess(
            tmp_path / "process.log",
            *command,
            env=bridge_env(
                settings,
                EDRONE_BRIDGE_AMQP_URL=through(settings.amqp_url.get_secret_value(), amqp_proxy),
                EDRONE_BRIDGE_AMQP_RECONNECT_INTERVAL_S="0.5",
                EDRONE_BRIDGE_HTTP_PORT=str(port),
                EDRONE_BRIDGE_METRICS_PORT=str(port),
                EDRONE_BRIDGE_SHUTDOWN_TIMEOUT_S="5",
                EDRONE_BRIDGE_SUBSCRIPTIONS__DRAIN_TIMEOUT_S="5",
                EDRONE_BRIDGE_TRACES__DRAIN_TIMEOUT_S="5",
            ),
        )
        base = f"http://127.0.0.1:{port}"
        await process.start()
        try:
            await wait_ready(base, 30)
            await amqp_proxy.cut()
            await wait_until(unready(base), 10)
            started = time.monotonic()
            code = await process.terminate(15)
            took_s = time.monotonic() - started
        finally:
            await process.kill()
        report(
            capsys,
            f"{' '.join(command)} SIGTERM, broker down",
            exit_code=code,
            took_s=round(took_s, 2),
        )
        assert code == 0, process.log_tail()
        assert took_s < 5, process.log_tail()


# Each long-running command, in each state of its start that waits on a service: SIGTERM ends
# it at once, exit 0 (an orchestrator would otherwise kill it at every stop).
STARTING = [
    ("broker refuses", ("ingress",)),
    ("broker refuses", ("consume", "subscriptions")),
    ("broker refuses", ("consume", "traces")),
    ("broker refuses", ("run",)),
    ("broker is silent", ("ingress",)),
    ("broker is silent", ("consume", "traces")),
    ("broker is silent", ("run",)),
    ("database is silent", ("consume", "subscriptions")),
    ("database is silent", ("consume", "traces")),
    ("database is silent", ("relay",)),
    ("database is silent", ("run",)),
]


class TestWhileStarting:
    @pytest.mark.parametrize(
        ("state", "command"), STARTING, ids=[f"{s}-{' '.join(c)}" for s, c in STARTING]
    )
    async def test_sigterm_ends_a_start_that_waits_on_a_service(
        self, state, command, settings, amqp_proxy, db_proxy, db, tmp_path
    ):
        """Stopped while it connects (refused and retrying, or waiting on a service that
        accepted the connection and says nothing), the command exits 0 within a second or
        two, far inside its grace period (SHUTDOWN_TIMEOUT_S 5 here)."""
        if state == "broker refuses":
            await amqp_proxy.cut()
        elif state == "broker is silent":
            amqp_proxy.stall()
        else:
            db_proxy.stall()
        port = free_port()
        process = BridgeProcess(
            tmp_path / "process.log",
            *command,
            env=bridge_env(
                settings,
                EDRONE_BRIDGE_AMQP_URL=through(settings.amqp_url.get_secret_value(), amqp_proxy),
                EDRONE_BRIDGE_DATABASE_URL=through(
                    settings.database_url.get_secret_value(), db_proxy
                ),
                EDRONE_BRIDGE_AMQP_CONNECT_ATTEMPTS="1000",
                EDRONE_BRIDGE_AMQP_CONNECT_DELAY_S="0.5",
                EDRONE_BRIDGE_HTTP_PORT=str(port),
                EDRONE_BRIDGE_METRICS_PORT=str(port),
                EDRONE_BRIDGE_SHUTDOWN_TIMEOUT_S="5",
                EDRONE_BRIDGE_SUBSCRIPTIONS__DRAIN_TIMEOUT_S="5",
                EDRONE_BRIDGE_TRACES__DRAIN_TIMEOUT_S="5",
            ),
        )
        await process.start()
        try:
            if state == "broker refuses":
                await wait_until(lambda: "amqp_connect_failed" in events_of(process), 20)
            else:
                await asyncio.sleep(2.0)  # into the wait: the connection is open and silent
            assert process.running, process.log_tail()
            asked = time.monotonic()
            code = await process.terminate(timeout_s=15)
            took_s = time.monotonic() - asked
        finally:
            await process.kill()
        assert code == 0, process.log_tail()
        assert took_s < 3.0, process.log_tail()
