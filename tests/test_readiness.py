"""Readiness that tells the truth: a consumer or the relay on a schema that lacks migrations is
not ready and says to run ``edrone-bridge migrate``, then becomes ready once someone does, with
no restart; every long-running part serves ``/metrics``, ``/healthz`` and ``/readyz``; and the
parts' default ports let them share a host."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge.app_config import AppConfig
from bridge.config import METRICS_PORTS, metrics_port
from bridge.metrics import Metrics, Readiness, exposed
from bridge.migrate import load_migrations, migrate
from bridge.relay import serve as serve_relay
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import serve_subscriptions, serve_traces, wait_until
from tests.support.processes import free_port
from tests.support.shop_tables import MAGENTO_TABLE, MAGENTO_TARGET


async def probe(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    try:
        async with session.get(url) as response:
            return response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, ValueError):
        return 0, None


async def unmigrated(settings, *statements: str) -> None:
    """The settings' schema, created empty (or with ``statements``): no migration applied."""
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{settings.database_schema}"')
        await conn.execute(f'SET search_path TO "{settings.database_schema}"')
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def migrate_now(settings) -> None:
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        await migrate(conn, settings.database_schema)
    finally:
        await conn.close()


SERVES = {
    "consume subscriptions": lambda settings, stopping: serve_subscriptions(settings, stopping),
    "consume traces": lambda settings, stopping: serve_traces(settings, stopping),
    "relay": lambda settings, stopping: serve_relay(settings, stopping),
}


class TestBehindItsMigrations:
    @pytest.mark.parametrize("part", sorted(SERVES))
    async def test_not_ready_until_migrated_then_ready_without_a_restart(
        self, part, make_settings, amqp_connection
    ):
        port = free_port()
        settings = make_settings(
            metrics_port=port,
            apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=MAGENTO_TARGET)},
        )
        await unmigrated(settings, MAGENTO_TABLE)
        stopping = asyncio.Event()
        task = asyncio.create_task(SERVES[part](settings, stopping))
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

                async def says_migrate() -> bool:
                    status, body = await probe(session, f"{base}/readyz")
                    return status == 503 and "run edrone-bridge migrate" in body["reason"]

                await wait_until(says_migrate, 15)
                _, body = await probe(session, f"{base}/readyz")
                count = len(load_migrations())
                assert body["reason"].startswith(
                    f"schema {settings.database_schema} lacks {count} of {count} migrations"
                )
                assert (await probe(session, f"{base}/healthz"))[0] == 200
                async with session.get(f"{base}/metrics") as response:
                    assert "edrone_bridge_" in await response.text()
                assert not task.done()

                await migrate_now(settings)

                async def ready() -> bool:
                    return (await probe(session, f"{base}/readyz"))[0] == 200

                await wait_until(ready, 20)
        finally:
            stopping.set()
            await asyncio.wait_for(task, 30)


class TestPorts:
    def test_each_part_has_its_own_default_port(self, make_settings):
        settings = make_settings(metrics_port=None)
        ports = {c: metrics_port(settings, c)[0] for c in SERVES}
        assert len(set(ports.values())) == len(ports)
        assert metrics_port(make_settings(metrics_port=9200), "relay") == (9200, False)

    async def test_a_default_port_taken_gives_way_to_a_free_one(self, make_settings, monkeypatch):
        """A second process of the same kind on the host still serves its /metrics."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            monkeypatch.setitem(METRICS_PORTS, "relay", busy)
            settings = make_settings(metrics_port=None, http_host="127.0.0.1")
            readiness = Readiness(reason=None)
            async with exposed(settings, Metrics(), readiness, "relay") as bound:
                assert bound not in (busy, 0)
                async with aiohttp.ClientSession() as session:
                    assert (await probe(session, f"http://127.0.0.1:{bound}/readyz"))[0] == 200

    async def test_an_explicit_port_taken_is_an_error(self, make_settings):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            settings = make_settings(metrics_port=busy, http_host="127.0.0.1")
            with pytest.raises(OSError):
                async with exposed(settings, Metrics(), Readiness(), "relay"):
                    pass
