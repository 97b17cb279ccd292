"""``edrone-bridge status`` against real RabbitMQ (its management API included) and PostgreSQL:
every queue counted, dead letters, idle work and stale retries judged unhealthy, a database
that does not answer or is not migrated named, and the AMQP fallback when the API is away."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
import structlog
from pamqp.commands import Basic

from bridge.amqp import Topology, declare_topology, declare_trace_topology, queue_specs, topology
from bridge.cli import main as cli
from bridge.headers import (
    HEADER_DEAD_LETTERED_AT,
    HEADER_FIRST_FAILURE,
    as_datetime,
    dead_letter_headers,
)
from bridge.metrics import Metrics
from bridge.migrate import load_migrations, migrate
from bridge.monitor import monitor
from bridge.ops.dlq import list_messages
from bridge.ops.queue_status import fetch_queues, management_for, vhost_of
from bridge.ops.status import Limits, Status, check_status, to_json
from bridge.parked import Ledger, Parked
from tests.support.cli import closed_port, run_cli
from tests.support.consumers import take_all

# The broker publishes queue statistics every 5 s, and a new queue's first ones within ~10 s.
STATS_WAIT_S = 25.0
MIGRATIONS = [m.name for m in load_migrations()]


@pytest.fixture(scope="session")
def management_url(amqp_url: str) -> str:
    """The management API beside the test broker; without it the API-path tests fail loudly."""
    url = os.environ.get("EDRONE_BRIDGE_TEST_MANAGEMENT_URL") or management_for(amqp_url).url
    login = management_for(amqp_url, url).authorization
    request = urllib.request.Request(f"{url}/api/overview", headers={"Authorization": login})
    try:
        with urllib.request.urlopen(request, timeout=5):
            pass
    except OSError as exc:
        pytest.fail(
            f"the RabbitMQ management API does not answer at {url} ({exc}); enable it with "
            "`rabbitmq-plugins enable rabbitmq_management` (.ci/run does), or point "
            "EDRONE_BRIDGE_TEST_MANAGEMENT_URL at it",
            False,
        )
    return url


@pytest.fixture
def no_management() -> str:
    """A management URL where nothing listens: status must fall back to AMQP."""
    return f"http://127.0.0.1:{closed_port()}"


class Deployment:
    """The test's own connection to the deployment's queues: publishes raw messages, holds
    deliveries unacked, reads what is left."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, settings) -> None:
        self.connection = connection
        self.settings = settings
        self.names: Topology = topology(settings)
        self.held: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def park(self, parked: Parked) -> None:
        """Its age into the ledger, as the runtime records it (the schema must be migrated)."""
        conn = await asyncpg.connect(self.settings.database_url.get_secret_value(), timeout=10)
        try:
            ledger = Ledger(conn, timeout_s=5, schema=self.settings.database_schema)
            await ledger.record([parked])
        finally:
            await conn.close()

    @property
    def subscriptions_dlq(self) -> str:
        return self.names.dead_letter_queue(self.names.subscriptions_queue)

    def tier(self, delay_s: float) -> str:
        return self.names.retry_queue(self.names.traces_queue, delay_s)

    async def publish(
        self, queue: str, headers: dict[str, Any] | None = None, message_id: str | None = None
    ) -> None:
        """One persistent message straight into ``queue``, confirmed."""
        channel = await self.connection.channel(publisher_confirms=True)
        async with channel:
            message = aio_pika.Message(
                b'{"event_id": "evt-1"}',
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=datetime.now(UTC),
                message_id=message_id,
            )
            confirmation = await channel.default_exchange.publish(
                message, queue, mandatory=True, timeout=5
            )
            assert isinstance(confirmation, Basic.Ack), confirmation

    async def dead_letter(self, age_s: float, message_id: str = "evt-1") -> None:
        """A dead letter as the runtime writes it, dead-lettered ``age_s`` ago: the copy,
        then its age in the ledger."""
        headers = dead_letter_headers({}, "HTTP 400: refused", self.names.subscriptions_queue)
        headers[HEADER_DEAD_LETTERED_AT] = _ago(age_s)
        await self.publish(self.subscriptions_dlq, headers, message_id)
        since = as_datetime(headers[HEADER_DEAD_LETTERED_AT])
        assert since is not None
        await self.park(Parked(self.subscriptions_dlq, message_id, since))

    async def retry(self, delay_s: float, failed_s_ago: float, message_id: str = "evt-1") -> None:
        """A copy in the retry tier of ``delay_s``, first failed ``failed_s_ago``."""
        tier = self.tier(delay_s)
        await self.publish(tier, {HEADER_FIRST_FAILURE: _ago(failed_s_ago)}, message_id)
        since = datetime.now(UTC) - timedelta(seconds=failed_s_ago)
        await self.park(Parked(tier, message_id, since))

    async def hold(self, queue: str) -> None:
        """Consume ``queue`` and keep what arrives unacked until the connection closes."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=1)
        source = await channel.get_queue(queue)
        await source.consume(self.held.append)

    async def take_all(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        return await take_all(self.connection, queue)


@pytest.fixture
async def deployment(amqp_connection, settings) -> Deployment:
    """Both sides' topology declared for the test's prefix (no consumer runs)."""
    channel = await amqp_connection.channel()
    async with channel:
        await declare_topology(channel, settings)
        await declare_trace_topology(channel, settings)
    return Deployment(amqp_connection, settings)


@pytest.fixture
def migrated(db) -> None:
    """The test's schema migrated (see the ``db`` fixture)."""


@pytest.fixture
def cli_env(monkeypatch):
    """No EDRONE_BRIDGE_* variable from outside; the process-wide logging the CLI configures
    is given back to the next tests afterwards."""
    for name in [n for n in os.environ if n.startswith("EDRONE_BRIDGE_")]:
        monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield monkeypatch
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture
def run_status(cli_env, capsys):
    """``edrone-bridge status ARGS`` in-process, configured by EDRONE_BRIDGE_* variables as in
    production, in a thread of its own (it runs its own event loop); (exit code, stdout)."""

    async def run(settings, *args: str) -> tuple[int, str]:
        for name, value in cli_variables(settings).items():
            cli_env.setenv(name, value)
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["status", *args])
        return code, capsys.readouterr().out

    return run


def cli_variables(settings) -> dict[str, str]:
    return {
        "EDRONE_BRIDGE_AMQP_URL": settings.amqp_url.get_secret_value(),
        "EDRONE_BRIDGE_AMQP_PREFIX": settings.amqp_prefix,
        "EDRONE_BRIDGE_DATABASE_URL": settings.database_url.get_secret_value(),
        "EDRONE_BRIDGE_DATABASE_SCHEMA": settings.database_schema,
        "EDRONE_BRIDGE_LOG_LEVEL": "warning",
    }


async def settled(settings, management_url: str, done, **options: Any) -> Status:
    """The status once the API counts every queue and ``done(status)`` holds: its counts lag
    the broker by seconds."""
    management = management_for(settings.amqp_url.get_secret_value(), management_url)
    deadline = asyncio.get_running_loop().time() + STATS_WAIT_S
    while True:
        status = await check_status(settings, management=management, **options)
        if counted_by_api(status) and done(status):
            return status
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"status never settled:\n{json.dumps(to_json(status), indent=2)}")
        await asyncio.sleep(0.5)


def counted_by_api(status: Status) -> bool:
    return all(q.source == "management" for q in status.queues)


def queue_of(status: Status, name: str):
    [queue] = [q for q in status.queues if q.name == name]
    return queue


def row(table: str, queue: str) -> str:
    [line] = [line for line in table.splitlines() if line.startswith(f"{queue} ")]
    return line


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


class TestManagementPath:
    async def test_healthy_deployment_exits_0_listing_every_queue(
        self, deployment, migrated, settings, management_url, run_status
    ):
        """A declared, migrated, idle deployment is healthy (exit 0), and ``--json`` lists
        every work, dead-letter and retry-tier queue with its counts from the API."""
        await settled(settings, management_url, lambda s: True)
        code, stdout = await run_status(settings, "--json", "--management-url", management_url)
        document = json.loads(stdout)
        assert code == 0, document["problems"]
        assert (document["healthy"], document["problems"]) == (True, [])
        names = deployment.names.queues(settings.traces.retry_tiers_s)
        assert [q["name"] for q in document["queues"]] == names
        kinds = [q["kind"] for q in document["queues"]]
        assert kinds == ["work"] * 3 + ["dlq"] * 3 + ["retry"] * len(names[6:])
        for queue in document["queues"]:
            counts = (queue["exists"], queue["ready"], queue["unacked"], queue["consumers"])
            assert counts == (True, 0, 0, 0), queue
            assert (queue["source"], queue["oldest_age_s"]) == ("management", None)
        assert document["broker"]["management_reachable"] is True
        assert "guest" not in stdout  # no credentials in the output
        database = document["database"]
        assert (database["reachable"], database["schema"]) == (True, settings.database_schema)
        assert database["migrations"] == {
            "applied": MIGRATIONS,
            "pending": [],
            "changed": [],
            "unknown": [],
        }

    async def test_a_dead_letter_is_unhealthy_naming_the_queue_its_size_and_age(
        self, deployment, migrated, settings, management_url, run_status
    ):
        """One message in a DLQ makes status exit 1; the table flags that queue's row with
        its size and the age since it was dead-lettered, and the message stays in place.
        ``--max-dlq 1`` tolerates it."""
        # An hour old: the table's "1h00m" holds however long the API takes to count it.
        await deployment.dead_letter(age_s=3605)
        dlq = deployment.subscriptions_dlq
        await settled(settings, management_url, lambda s: queue_of(s, dlq).ready == 1)
        code, table = await run_status(settings, "--management-url", management_url)
        assert code == 1, table
        assert table.startswith("edrone-bridge status: UNHEALTHY (1 problem)\n")
        # QUEUE KIND READY UNACKED CONSUMERS OLDEST REPLICAS LEADER, then the flag
        amqp_url = settings.amqp_url.get_secret_value()
        api = management_for(amqp_url, management_url)
        leader = (await fetch_queues(api, vhost_of(amqp_url), [dlq], 10))[dlq]["leader"]
        flagged = [dlq, "dlq", "1", "0", "0", "1h00m", "1/1", leader, "<<", "DEAD", "LETTERS"]
        assert row(table, dlq).split() == flagged
        assert f"  {dlq}: holds 1 dead-lettered message (allowed: 0), oldest 36" in table
        assert "edrone-bridge dlq list subscriptions" in table
        code, _ = await run_status(settings, "--management-url", management_url, "--max-dlq", "1")
        assert code == 0
        [kept] = await deployment.take_all(dlq)
        assert kept.body == b'{"event_id": "evt-1"}'

    async def test_a_held_message_counts_as_unacked(
        self, deployment, migrated, settings, management_url
    ):
        """While a consumer holds a message unacked, the work queue shows it as unacked with
        one consumer, not as ready, and that is healthy."""
        work = deployment.names.subscriptions_queue
        await deployment.publish(work)
        await deployment.hold(work)
        status = await settled(settings, management_url, lambda s: queue_of(s, work).unacked == 1)
        queue = queue_of(status, work)
        assert (queue.ready, queue.unacked, queue.consumers) == (0, 1, 1)
        assert status.healthy, status.problems
        assert len(deployment.held) == 1

    async def test_ready_messages_without_consumer_are_unhealthy_and_never_peeked(
        self, deployment, migrated, settings, management_url, run_status
    ):
        """A work queue with ready messages and no consumer is unhealthy; its age is reported
        unknown rather than read, because a read would count toward its delivery limit."""
        work = deployment.names.traces_queue
        await deployment.publish(work)
        await settled(settings, management_url, lambda s: queue_of(s, work).ready == 1)
        code, stdout = await run_status(settings, "--json", "--management-url", management_url)
        document = json.loads(stdout)
        assert code == 1
        assert document["problems"] == [
            {"code": "no_consumer", "subject": work, "reason": "1 ready message and no consumer"}
        ]
        [queue] = [q for q in document["queues"] if q["name"] == work]
        assert (queue["ready"], queue["oldest_age_s"]) == (1, None)
        assert any("never peeked" in note for note in document["notes"])
        [untouched] = await deployment.take_all(work)
        assert not untouched.redelivered
        assert untouched.headers.get("x-delivery-count", 0) == 0


class TestFallback:
    async def test_without_the_api_ready_counts_come_from_amqp_and_unacked_is_unknown(
        self, deployment, migrated, settings, no_management, run_status
    ):
        """With the management API unreachable, status still counts ready messages and
        consumers (AMQP passive declares), reports unacked as unknown (null, "?") with a note,
        and is not unhealthy for that alone."""
        await deployment.dead_letter(age_s=3605)  # "1h00m" for a minute: no race with the clock
        dlq = deployment.subscriptions_dlq
        code, stdout = await run_status(
            settings, "--json", "--management-url", no_management, "--max-dlq", "1"
        )
        document = json.loads(stdout)
        assert code == 0, document["problems"]
        broker = document["broker"]
        assert (broker["reachable"], broker["management_reachable"]) == (True, False)
        assert broker["management_error"]
        for queue in document["queues"]:
            assert (queue["source"], queue["unacked"]) == ("amqp", None)
            assert queue["ready"] == (1 if queue["name"] == dlq else 0)
        [queue] = [q for q in document["queues"] if q["name"] == dlq]
        assert 3604 < queue["oldest_age_s"] < 3660
        assert any("management API unavailable" in note for note in document["notes"])
        code, table = await run_status(
            settings, "--management-url", no_management, "--max-dlq", "1"
        )
        assert code == 0
        assert row(table, dlq).split()[2:6] == ["1", "?", "0", "1h00m"]
        assert "counts over AMQP" in table

    async def test_a_retry_past_its_schedule_is_too_old(
        self, deployment, migrated, settings, no_management
    ):
        """A retry tier's message may be as old (since its first failure) as its tier's and
        the shorter tiers' delays plus --max-age-s; older, it is reported too old."""
        tiers = settings.traces.retry_tiers_s
        tier = deployment.tier(tiers[3])
        allowed_s = sum(tiers[:4]) + 600
        await deployment.retry(tiers[3], failed_s_ago=allowed_s + 60)
        management = management_for(settings.amqp_url.get_secret_value(), no_management)
        status = await check_status(settings, management=management)
        queue = queue_of(status, tier)
        assert (queue.age_since, queue.age_limit_s) == ("first_failure", allowed_s)
        assert allowed_s + 59 < queue.oldest_age_s < allowed_s + 120
        assert [p.code for p in status.problems if p.subject == tier] == ["too_old"]
        relaxed = await check_status(settings, management=management, limits=Limits(max_age_s=3600))
        assert not [p for p in relaxed.problems if p.subject == tier]


class TestServicesDown:
    async def test_unreachable_database_is_named(
        self, deployment, make_settings, settings, no_management, run_status
    ):
        """A database that does not answer makes status exit 1 and names it, without its
        credentials; the broker part is still reported."""
        port = closed_port()
        down = make_settings(database_url=f"postgresql://postgres:pw@127.0.0.1:{port}/test")
        code, table = await run_status(down, "--management-url", no_management)
        assert code == 1
        where = f"postgresql://127.0.0.1:{port}/test"
        assert f"database: {where}, schema {settings.database_schema} UNREACHABLE: " in table
        assert f"  database: PostgreSQL at {where}: " in table
        assert "pw" not in table
        assert row(table, deployment.names.subscriptions_queue).split()[2] == "0"

    async def test_unreachable_broker_is_named(self, migrated, make_settings, no_management):
        """A broker that does not answer makes status unhealthy naming it; every queue is
        then unknown, not missing."""
        down = make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
        management = management_for(down.amqp_url.get_secret_value(), no_management)
        status = await check_status(down, management=management, timeout_s=3)
        assert [p.code for p in status.problems] == ["broker_unreachable"]
        assert {q.exists for q in status.queues} == {None}
        assert status.database.reachable

    async def test_pending_migrations_are_unhealthy(
        self, deployment, settings, database_url, no_management
    ):
        """An unmigrated schema is unhealthy and names every pending migration; once
        migrated, the database is fine."""
        management = management_for(settings.amqp_url.get_secret_value(), no_management)
        status = await check_status(settings, management=management)
        [problem] = status.problems
        assert (problem.code, status.database.pending) == ("migrations_pending", MIGRATIONS)
        assert "run `edrone-bridge migrate`" in problem.reason
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await migrate(conn, settings.database_schema)
        finally:
            await conn.close()
        status = await check_status(settings, management=management)
        assert status.healthy, status.problems
        assert status.database.applied == MIGRATIONS


class TestUsage:
    def test_help_needs_no_services(self):
        """``status --help`` works without configuration or services and names every option."""
        result = run_cli("status", "--help")
        assert result.returncode == 0, result.stderr
        for option in ("--json", "--max-dlq", "--max-age-s", "--management-url", "--timeout-s"):
            assert option in result.stdout

    def test_bad_options_exit_2(self, cli_env, capsys):
        """A negative --max-dlq or a management URL that is not http(s) is a usage error."""
        with pytest.raises(SystemExit) as stopped:
            cli.main(["status", "--max-dlq", "-1"])
        assert stopped.value.code == 2
        assert cli.main(["status", "--management-url", "ftp://broker"]) == 2
        assert "--management-url: expected an http:// or https:// URL" in capsys.readouterr().err


class TestPieces:
    def test_management_url_follows_the_broker(self):
        """The API is looked for on the broker's host, port 15672 (15671 under TLS), with the
        AMQP login; an explicit URL's own login wins."""
        plain = management_for("amqp://bridge:s3cret@rabbit.internal:5672/shop")
        assert plain.url == "http://rabbit.internal:15672"
        assert plain.authorization == "Basic YnJpZGdlOnMzY3JldA=="  # bridge:s3cret
        assert management_for("amqps://rabbit.internal/").url == "https://rabbit.internal:15671"
        given = management_for("amqp://bridge:s3cret@h/", "https://ops:pw@mq.example/rabbit/")
        assert given.url == "https://mq.example/rabbit"
        assert given.authorization == "Basic b3BzOnB3"  # ops:pw
        with pytest.raises(ValueError):
            management_for("amqp://h/", "mq.example:15672")

    def test_vhost_is_read_as_the_client_reads_it(self):
        """``/`` by default; ``%2F`` stands for a slash inside a vhost name."""
        assert [vhost_of(u) for u in ("amqp://h", "amqp://h/", "amqp://h/shop")] == [
            "/",
            "/",
            "shop",
        ]
        assert vhost_of("amqp://h/%2Fshop") == "/shop"

    def test_retry_tiers_are_allowed_their_schedule(self, settings):
        """Each retry tier, of either trace lane, may wait out its own and every shorter tier's
        delay."""
        tiers = settings.traces.retry_tiers_s
        names = topology(settings)
        for lane in names.trace_lanes:
            retry = [s for s in queue_specs(settings) if s.kind == "retry" and s.work_queue == lane]
            expected = [sum(tiers[: i + 1]) for i in range(len(tiers))]
            assert [s.scheduled_s for s in retry] == expected


class TestObservingNeverDisturbs:
    """``status``, the metrics sampler and ``dlq list`` read counts and ages without moving or
    redelivering a message: on RabbitMQ 3.10 a peek moves a quorum queue's head to its back,
    so ages come from the ledger the bridge keeps (bridge/parked.py)."""

    async def test_order_and_oldest_age_stay_across_20_status_calls_and_the_sampler(
        self, deployment, migrated, settings, management_url, amqp_connection
    ):
        """Three dead letters, 300, 200 and 100 s old: 20 status calls and sampler rounds
        all say the oldest is 300 s (plus the time gone by), and afterwards the DLQ holds
        them in their order, none ever delivered."""
        dlq = deployment.subscriptions_dlq
        for message_id, age_s in (("d1", 300), ("d2", 200), ("d3", 100)):
            await deployment.dead_letter(age_s=age_s, message_id=message_id)
        started = time.monotonic()
        status = await settled(settings, management_url, lambda s: queue_of(s, dlq).ready == 3)
        metrics = Metrics()
        gauge = "edrone_bridge_queue_oldest_message_age_seconds"
        pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=2,
            server_settings={"search_path": settings.database_schema},
        )
        sampler = asyncio.create_task(
            monitor(
                amqp_connection,
                metrics,
                work_queues={},
                parked_queues=[dlq],
                pool=pool,
                interval_s=0.1,
            )
        )
        ages = []
        try:
            for _ in range(20):
                status = await check_status(
                    settings,
                    management=management_for(settings.amqp_url.get_secret_value(), management_url),
                )
                queue = queue_of(status, dlq)
                assert (queue.ready, queue.aged, queue.age_since) == (3, 3, "dead_lettered")
                ages.append(queue.oldest_age_s)
                elapsed = time.monotonic() - started
                assert 300 <= queue.oldest_age_s <= 300 + elapsed + 2, ages
                sampled = metrics.registry.get_sample_value(gauge, {"queue": dlq})
                if sampled:  # from the sampler's first round on
                    assert 300 <= sampled <= 300 + elapsed + 2
        finally:
            sampler.cancel()
            await pool.close()
        assert ages == sorted(ages)  # the clock only runs forward: never another head's age
        assert metrics.registry.get_sample_value(gauge, {"queue": dlq}) >= 300
        assert (queue.consumers, queue.unacked) == (0, 0)  # nothing ever read it
        kept = await deployment.take_all(dlq)
        assert [m.message_id for m in kept] == ["d1", "d2", "d3"]
        # First delivered now: not redelivered, and the quorum queue counts no delivery before.
        assert [(m.redelivered, (m.headers or {}).get("x-delivery-count", 0)) for m in kept] == [
            (False, 0)
        ] * 3

    async def test_dlq_list_keeps_the_order_across_20_reads(self, deployment, migrated, settings):
        """``dlq list`` holds every message while it reads and hands them back together, so
        20 listings show the same order, and the ledger's age is untouched."""
        dlq = deployment.subscriptions_dlq
        for message_id, age_s in (("d1", 300), ("d2", 200), ("d3", 100)):
            await deployment.dead_letter(age_s=age_s, message_id=message_id)
        for _ in range(20):
            listing = await list_messages(settings, "subscriptions")
            assert [m.id for m in listing.messages] == ["d1", "d2", "d3"]
        status = await check_status(settings)
        assert 300 <= queue_of(status, dlq).oldest_age_s < 400

    async def test_a_message_the_broker_dead_lettered_is_counted_not_read(
        self, amqp_connection, migrated, settings, management_url
    ):
        """A message the broker dead-lettered itself (its delivery limit) has no age in the
        ledger: status counts it, says its age is unknown and why, and leaves it unread."""
        limited = settings.model_copy(
            update={
                "subscriptions": settings.subscriptions.model_copy(update={"delivery_limit": 1})
            }
        )
        names = topology(limited)
        work, dlq = names.subscriptions_queue, names.dead_letter_queue(names.subscriptions_queue)
        channel = await amqp_connection.channel(publisher_confirms=True)
        async with channel:
            await declare_topology(channel, limited)
            await declare_trace_topology(channel, limited)
            message = aio_pika.Message(
                b'{"event_id": "evt-1"}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await channel.default_exchange.publish(message, work, mandatory=True, timeout=5)
            source = await channel.get_queue(work)
            for _ in range(10):  # handed back until the broker gives up on it
                delivery = await source.get(no_ack=False, fail=False, timeout=5)
                if delivery is None:
                    break
                await delivery.reject(requeue=True)
        management = management_for(settings.amqp_url.get_secret_value(), management_url)
        status = await settled(limited, management_url, lambda s: queue_of(s, dlq).ready == 1)
        for _ in range(3):
            status = await check_status(limited, management=management)
        queue = queue_of(status, dlq)
        assert (queue.ready, queue.aged, queue.oldest_age_s) == (1, 0, None)
        assert any(
            note.startswith(f"{dlq}: 1 message with no age kept by the bridge")
            for note in status.notes
        ), status.notes
        [kept] = await take_all(amqp_connection, dlq)
        assert not kept.redelivered

    async def test_the_sampler_forgets_the_ages_of_an_emptied_queue(
        self, deployment, migrated, settings, amqp_connection, db
    ):
        """Messages removed behind the bridge's back (a purge in the management UI): once the
        sampler finds their queue empty it forgets their ages; a queue that holds messages
        keeps its ages."""
        dlq = deployment.subscriptions_dlq
        tier = deployment.tier(settings.traces.retry_tiers_s[0])
        await deployment.dead_letter(age_s=60, message_id="gone")
        await deployment.retry(settings.traces.retry_tiers_s[0], failed_s_ago=5)
        channel = await amqp_connection.channel()
        async with channel:
            await (await channel.get_queue(dlq)).purge()
        pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=2,
            server_settings={"search_path": settings.database_schema},
        )
        metrics = Metrics()
        sampler = asyncio.create_task(
            monitor(
                amqp_connection,
                metrics,
                work_queues={},
                parked_queues=[dlq, tier],
                pool=pool,
                interval_s=0.1,
            )
        )
        try:
            async with asyncio.timeout(10):
                while await db.fetchval(  # noqa: ASYNC110 (a table: nothing to wait on)
                    "SELECT count(*) FROM parked_messages WHERE queue = $1", dlq
                ):
                    await asyncio.sleep(0.05)
        finally:
            sampler.cancel()
            await pool.close()
        assert await db.fetchval("SELECT count(*) FROM parked_messages WHERE queue = $1", tier) == 1
