"""The ``edrone-bridge`` command, run as a subprocess: help, configuration errors, ``migrate``,
``sign``, ``simulate`` against a real local HTTP server that verifies what it receives, and
``fake-edrone``. The ``dlq`` commands are tested in test_dlq.py."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import aio_pika
import aiohttp
import asyncpg
import pytest
from aiohttp import web
from pamqp.commands import Basic

from bridge.app_config import AppConfig
from bridge.devtools.fake_edrone import FakeEdrone
from bridge.devtools.simulate import Summary, build_webhook, send_webhooks
from bridge.ingress.webhook import WebhookRejected, verify_webhook
from bridge.signing import php_string
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.cli import (
    REPO,
    cli_env,
    closed_port,
    run_cli,
    run_cli_async,
    wait_until_ready,
)

SIG_A = "MjFkYWM4NDEzMTc0YmY1MTlhOWFhNDI5OTUwZGM2N2E4NjExYzYzMDE0NjI2N2Q5N2NjMzgyZGU3ZTQwMGNjOQ=="
TOKEN_E = "7a8585bb3931f7a23c905314519624b5326c75b73c76f34ed4762820338fbbbc"
VECTOR_A = [
    "--email=jan.kowalski@example.com",
    "--status=0",
    "--reason=1",
    "--event-date=2024-01-15 10:30:00",
    "--event-id=evt-123",
]
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -c requirements/lock.txt -e '.[test]'"
    " && .venv/bin/pytest"
)


class TestHelp:
    @pytest.mark.parametrize(
        "command",
        [
            [],
            ["run"],
            ["ingress"],
            ["consume"],
            ["consume", "subscriptions"],
            ["consume", "traces"],
            ["migrate"],
            ["dlq"],
            ["dlq", "list"],
            ["dlq", "show"],
            ["dlq", "replay"],
            ["dlq", "purge"],
            ["sign"],
            ["simulate"],
            ["fake-edrone"],
            ["history"],
            ["status"],
            ["relay"],
        ],
        ids=lambda c: " ".join(c) or "edrone-bridge",
    )
    def test_every_command_has_help(self, command):
        """``--help`` works on every command, without configuration or services."""
        result = run_cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: edrone-bridge {' '.join(command)}".rstrip())

    def test_no_command_is_a_usage_error(self):
        """Without a command the CLI says so and exits 2."""
        result = run_cli()
        assert result.returncode == 2
        assert "required: COMMAND" in result.stderr


class TestConfigErrors:
    def test_bad_variable_exits_2_naming_the_key(self):
        """Invalid configuration stops any command with exit code 2 and names the key."""
        result = run_cli("migrate", EDRONE_BRIDGE_HTTP_PORT="eighty")
        assert result.returncode == 2
        assert "http_port" in result.stderr
        assert "Traceback" not in result.stderr

    def test_bad_app_option_in_the_file_is_named(self, tmp_path):
        """A bad per-app option in the TOML file is named by its dotted key."""
        config = tmp_path / "bridge.toml"
        config.write_text('[apps.shop]\nsecret = "s"\nversion = "NATIVE_9"\n')
        result = run_cli("sign", EDRONE_BRIDGE_CONFIG=str(config))
        assert result.returncode == 2
        assert "apps.shop.version" in result.stderr


@pytest.fixture
def cli_schema(database_url: str) -> Iterator[str]:
    """A schema name of its own for a CLI run; dropped afterwards."""
    schema = f"test_cli_{uuid.uuid4().hex[:12]}"
    yield schema

    async def drop() -> None:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


class TestMigrate:
    def test_migrate_applies_then_reports_up_to_date(self, database_url, cli_schema):
        """``migrate`` prints each migration it applied; a second run applies nothing."""
        env = {
            "EDRONE_BRIDGE_DATABASE_URL": database_url,
            "EDRONE_BRIDGE_DATABASE_SCHEMA": cli_schema,
        }
        first = run_cli("migrate", **env)
        assert first.returncode == 0, first.stderr
        migrations = sorted((REPO / "schemas" / "migrations").glob("*.sql"))
        assert first.stdout.splitlines() == [f"applied {path.name}" for path in migrations]
        second = run_cli("migrate", **env)
        assert second.returncode == 0, second.stderr
        assert second.stdout == f"schema {cli_schema} is up to date\n"

    def test_logs_are_json_lines_off_a_terminal(self, database_url, cli_schema):
        """Off a terminal the logs are one JSON object per line on stderr, stdout stays clean."""
        result = run_cli(
            "migrate",
            EDRONE_BRIDGE_DATABASE_URL=database_url,
            EDRONE_BRIDGE_DATABASE_SCHEMA=cli_schema,
        )
        events = [json.loads(line) for line in result.stderr.splitlines()]
        applied = [e for e in events if e["event"] == "migration_applied"]
        assert applied and applied[0]["schema"] == cli_schema
        assert {"level", "timestamp", "logger"} <= applied[0].keys()

    def test_log_level_is_honoured(self, database_url, cli_schema):
        """``EDRONE_BRIDGE_LOG_LEVEL=warning`` silences the info events."""
        result = run_cli(
            "migrate",
            EDRONE_BRIDGE_DATABASE_URL=database_url,
            EDRONE_BRIDGE_DATABASE_SCHEMA=cli_schema,
            EDRONE_BRIDGE_LOG_LEVEL="warning",
        )
        assert result.returncode == 0
        assert result.stderr == ""

    def test_database_down_fails_with_one_readable_line(self):
        """An unreachable database ends ``migrate`` with exit 1 and a log line, no traceback."""
        url = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
        result = run_cli("migrate", EDRONE_BRIDGE_DATABASE_URL=url)
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert json.loads(line)["event"] == "command_failed"


class TestSign:
    def test_prints_vector_a(self):
        """``sign`` prints docs/protocol.md vector A's signature, and nothing else."""
        result = run_cli("sign", f"--app-id={TEST_APP_ID}", f"--secret={TEST_SECRET}", *VECTOR_A)
        assert result.returncode == 0, result.stderr
        assert result.stdout == SIG_A + "\n"

    def test_secret_from_the_configured_app(self):
        """Without ``--secret`` the only configured app's id and secret are used."""
        result = run_cli("sign", *VECTOR_A, EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:{TEST_SECRET}")
        assert result.stdout == SIG_A + "\n"

    def test_show_input_masks_the_secret(self):
        """``--show-input`` shows the formula and the fields in order, never the secret."""
        result = run_cli(
            "sign", "--show-input", *VECTOR_A, EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:{TEST_SECRET}"
        )
        assert result.returncode == 0, result.stderr
        assert TEST_SECRET not in result.stdout + result.stderr
        assert "'jan.kowalski@example.com' . '0' . '1'" in result.stdout
        assert f"<app_secret> . '{TEST_APP_ID}'" in result.stdout
        assert result.stdout.splitlines()[-1] == f"signature: {SIG_A}"

    def test_legacy_unsubscribe_token(self):
        """For the unsubscribe callback ``sign`` prints vector E's hex token."""
        result = run_cli(
            "sign",
            "--version=LEGACY_UNSUBSCRIBE",
            "--email=jan.kowalski@example.com",
            f"--app-id={TEST_APP_ID}",
            f"--secret={TEST_SECRET}",
        )
        assert result.stdout == TOKEN_E + "\n"

    def test_unknown_app_without_secret_is_a_usage_error(self):
        """Asking to sign for an app that is not configured, without a secret, exits 2."""
        result = run_cli("sign", "--app-id=nope", *VECTOR_A, EDRONE_BRIDGE_APPS="other:s")
        assert result.returncode == 2
        assert "'nope' is not configured" in result.stderr


class VerifyingServer:
    """A real HTTP server standing in for the ingress: it verifies each webhook exactly as the
    ingress does, records the messages, and can be told to fail some requests or be slow."""

    def __init__(self, *, fail_every: int = 0, delay_s: float = 0.0) -> None:
        self.apps = {TEST_APP_ID: AppConfig(secret=TEST_SECRET)}
        self.fail_every = fail_every
        self.delay_s = delay_s
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.content_types: list[str] = []
        self.messages: list = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        number = self.requests
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_every and number % self.fail_every == 0:
                return web.json_response({"error": "broker_unavailable"}, status=503)
            return await self._verify(request)
        finally:
            self.in_flight -= 1

    async def _verify(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        if request.content_type == "application/json":
            body = {k: php_string(v) for k, v in (await request.json()).items()}
        else:
            body = {k: str(v) for k, v in (await request.post()).items()}
        try:
            message, _ = verify_webhook(body, dict(request.query), self.apps, datetime.now(UTC))
        except WebhookRejected as exc:
            return web.json_response({"error": exc.error}, status=exc.status)
        self.messages.append(message)
        return web.json_response({"status": "accepted", "event_id": message.event_id})


@pytest.fixture
async def serve() -> AsyncIterator:
    """Starts a VerifyingServer on a free port; returns it and its webhook URL."""
    runners: list[web.AppRunner] = []

    async def start(**options) -> tuple[VerifyingServer, str]:
        server = VerifyingServer(**options)
        app = web.Application()
        app.add_routes([web.post("/update_subscriber_status", server.handle)])
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return server, f"http://127.0.0.1:{port}/update_subscriber_status"

    yield start
    for runner in runners:
        await runner.cleanup()


def bodies(version: str, count: int, channel: str = "email", secret: str = TEST_SECRET):
    return [build_webhook(version, TEST_APP_ID, secret, channel=channel) for _ in range(count)]


class TestSimulate:
    @pytest.mark.parametrize("body_format", ["json", "form"])
    @pytest.mark.parametrize(
        ("version", "channel"),
        [
            ("NATIVE_5", "email"),
            ("NATIVE_5", "sms"),
            ("NATIVE_4", "email"),
            ("LEGACY_UPDATE", "email"),
            ("LEGACY_UNSUBSCRIBE", "email"),
        ],
    )
    async def test_sent_webhooks_verify(self, serve, version, channel, body_format):
        """Every webhook simulate sends verifies with bridge.ingress.webhook.verify_webhook, in the
        chosen version, channel and encoding, each with its own event id."""
        server, url = await serve()
        summary = await send_webhooks(url, bodies(version, 6, channel), body_format=body_format)
        assert summary.outcomes == {"200": 6}
        assert summary.all_accepted
        assert [(m.protocol, m.channel) for m in server.messages] == [(version, channel)] * 6
        assert len({m.event_id for m in server.messages}) == 6
        expected_type = (
            "application/json" if body_format == "json" else "application/x-www-form-urlencoded"
        )
        assert set(server.content_types) == {expected_type}

    async def test_statuses_are_counted(self, serve):
        """Each answer is counted under its status, with a sample of a failing answer."""
        _, url = await serve(fail_every=2)
        summary = await send_webhooks(url, bodies("NATIVE_5", 10), concurrency=1)
        assert summary.outcomes == {"200": 5, "503": 5}
        assert not summary.all_accepted
        assert "broker_unavailable" in summary.samples["503"]
        assert len(summary.latencies_s) == 10
        assert "200: 5" in summary.render()
        assert "503: 5" in summary.render()

    async def test_wrong_secret_is_counted_as_401(self, serve):
        """Webhooks signed with another secret come back 401 and are not 'accepted'."""
        _, url = await serve()
        summary = await send_webhooks(url, bodies("NATIVE_4", 3, secret="wrong"))
        assert summary.outcomes == {"401": 3}
        assert not summary.all_accepted

    async def test_concurrency_is_bounded(self, serve):
        """No more than ``concurrency`` requests are ever in flight."""
        server, url = await serve(delay_s=0.02)
        await send_webhooks(url, bodies("NATIVE_5", 20), concurrency=3)
        assert 1 < server.max_in_flight <= 3

    async def test_each_request_is_bounded_by_the_timeout(self, serve):
        """A server that never answers in time costs at most the timeout per request."""
        _, url = await serve(delay_s=5)
        started = time.perf_counter()
        summary = await send_webhooks(url, bodies("NATIVE_5", 4), concurrency=4, timeout_s=0.2)
        assert time.perf_counter() - started < 2
        assert summary.count == 4
        assert not summary.all_accepted

    async def test_unreachable_ingress_is_counted_not_raised(self):
        """Connection errors are counted per request; the run still ends with a summary."""
        url = f"http://127.0.0.1:{closed_port()}/update_subscriber_status"
        summary = await send_webhooks(url, bodies("NATIVE_5", 3), timeout_s=2)
        assert summary.count == 3
        assert not summary.all_accepted

    def test_percentiles_use_nearest_rank(self):
        """p50 and p99 are nearest-rank percentiles of the request latencies."""
        summary = Summary(latencies_s=[i / 1000 for i in range(1, 101)])
        assert summary.percentile_ms(50) == pytest.approx(50)
        assert summary.percentile_ms(99) == pytest.approx(99)
        assert Summary().percentile_ms(99) == 0

    async def test_command_sends_and_summarises(self, serve):
        """``simulate`` sends N signed webhooks, prints a per-status summary, exits 0 on all 2xx."""
        server, url = await serve()
        code, stdout, stderr = await run_cli_async(
            "simulate",
            f"--url={url}",
            "--count=20",
            "--concurrency=4",
            "--format=form",
            "--version=NATIVE_5",
            "--channel=sms",
            EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:{TEST_SECRET}",
        )
        assert code == 0, stderr
        assert "  200: 20" in stdout
        assert "requests/s" in stdout and "p50" in stdout and "p99" in stdout
        assert len(server.messages) == 20
        assert {m.channel for m in server.messages} == {"sms"}

    async def test_command_fails_unless_every_answer_is_2xx(self, serve):
        """One non-2xx answer makes ``simulate`` exit non-zero."""
        _, url = await serve(fail_every=5)
        code, stdout, _ = await run_cli_async(
            "simulate",
            f"--url={url}",
            "--count=5",
            f"--app-id={TEST_APP_ID}",
            f"--secret={TEST_SECRET}",
        )
        assert code == 1
        assert "503: 1" in stdout


async def wait_for_rows(db: asyncpg.Connection, schema: str, count: int) -> int:
    deadline = time.monotonic() + 30
    while True:
        rows = await db.fetchval(f'SELECT count(*) FROM "{schema}".subscribers')
        if rows >= count or time.monotonic() > deadline:
            return int(rows)
        await asyncio.sleep(0.2)


async def publish_shop_change(settings, email: str) -> None:
    """The shop's own change, as its platform publishes it, once ``run`` has bound its queue
    (until then the exchange returns it unroutable)."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection, asyncio.timeout(30):
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            settings.platform_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        body = {
            "event_id": f"shop-{uuid.uuid4()}",
            "occurred_at": datetime.now(UTC).isoformat(),
            "email": email,
            "subscriber_status": 1,
        }
        message = aio_pika.Message(json.dumps(body).encode(), delivery_mode=2, message_id="m1")
        while True:
            routed = await exchange.publish(message, settings.platform_routing_key, timeout=10)
            if isinstance(routed, Basic.Ack):
                return
            await asyncio.sleep(0.1)


class TestRun:
    async def test_run_migrates_serves_applies_and_stops_on_sigterm(self, settings, tmp_path):
        """``run`` migrates, accepts signed webhooks, applies them to the ledger, forwards the
        shop's changes to edrone, and on SIGTERM drains and exits 0."""
        port = closed_port()
        fake = FakeEdrone()
        await fake.start()
        # A file, not a pipe: a pipe nobody reads fills up and blocks the bridge's logging.
        log_file = (tmp_path / "run.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "run",
            env=cli_env(
                EDRONE_BRIDGE_AMQP_URL=settings.amqp_url.get_secret_value(),
                EDRONE_BRIDGE_DATABASE_URL=settings.database_url.get_secret_value(),
                EDRONE_BRIDGE_DATABASE_SCHEMA=settings.database_schema,
                EDRONE_BRIDGE_AMQP_PREFIX=settings.amqp_prefix,
                EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:{TEST_SECRET}",
                EDRONE_BRIDGE_HTTP_HOST="127.0.0.1",
                EDRONE_BRIDGE_HTTP_PORT=str(port),
                EDRONE_BRIDGE_PLATFORM_EXCHANGE=settings.platform_exchange,
                EDRONE_BRIDGE_TRACE_URL=fake.url,
            ),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            await wait_until_ready(f"http://127.0.0.1:{port}", process)
            await publish_shop_change(settings, "shop.change@example.com")
            url = f"http://127.0.0.1:{port}{settings.webhook_path}"
            summary = await send_webhooks(url, bodies("NATIVE_5", 30) + bodies("NATIVE_4", 10))
            assert summary.outcomes == {"200": 40}
            db = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
            try:
                rows = await wait_for_rows(db, settings.database_schema, 40)
            finally:
                await db.close()
            assert rows == 40, (tmp_path / "run.log").read_text()[-3000:]
            async with asyncio.timeout(30):
                while not fake.requests:  # noqa: ASYNC110 - the fake records, we poll
                    await asyncio.sleep(0.1)
            [trace] = fake.requests
            assert trace.form["email"] == "shop.change@example.com"
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            log_file.close()
            await fake.stop()
        logged = (tmp_path / "run.log").read_text()
        assert process.returncode == 0, logged[-2000:]
        events = [json.loads(line)["event"] for line in logged.splitlines()]
        assert "migration_applied" in events
        assert "stop_requested" in events


class TestFakeEdrone:
    async def test_serves_until_sigterm(self, tmp_path):
        """``fake-edrone`` answers /healthz and traces like edrone, records them, and exits 0
        on SIGTERM."""
        port = closed_port()
        log_file = (tmp_path / "fake.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "fake-edrone",
            f"--port={port}",
            "--latency-ms=1",
            env=cli_env(),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                await wait_for_healthz(session, base, process)
                form = {"app_id": TEST_APP_ID, "email": "a@example.com", "action_type": "subscribe"}
                async with session.post(f"{base}/trace", data=form) as response:
                    assert response.status == 200
                    assert response.headers["x-edrone-event-id"]
                async with session.get(f"{base}/requests") as response:
                    [recorded] = (await response.json())["requests"]
                assert recorded["form"] == form
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            log_file.close()
        logged = (tmp_path / "fake.log").read_text()
        assert process.returncode == 0, logged[-2000:]
        events = [json.loads(line)["event"] for line in logged.splitlines()]
        lifecycle = ("fake_edrone_listening", "stop_requested", "fake_edrone_stopping")
        assert [e for e in events if e in lifecycle] == list(lifecycle)

    @pytest.mark.parametrize(
        ("option", "named"),
        [
            ("--failure-rate=1.5", "failure_rate"),
            ("--status=700", "status"),
            ("--latency-ms=-1", "latency_ms"),
            ("--retry-after=-5", "retry_after"),
        ],
    )
    def test_bad_fault_values_exit_2(self, option, named):
        """An impossible fault setting stops ``fake-edrone`` at once with exit 2, naming it."""
        result = run_cli("fake-edrone", f"--port={closed_port()}", option)
        assert result.returncode == 2
        assert f"invalid faults: {named}" in result.stderr


async def wait_for_healthz(
    session: aiohttp.ClientSession, base_url: str, process: asyncio.subprocess.Process
) -> None:
    """Poll ``/healthz`` until it answers 200; fail if the process exits or 30 s pass."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.returncode is None, "fake-edrone exited before it answered"
        try:
            async with session.get(f"{base_url}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail("fake-edrone did not answer /healthz within 30 s")


class TestDocs:
    def test_ci_runs_the_readme_test_command(self):
        """The test command a newcomer copies from the README is exactly what CI runs."""
        assert TEST_COMMAND in (REPO / "README.md").read_text()
        assert TEST_COMMAND in (REPO / ".ci" / "run").read_text()
