"""Fault fixtures: a TCP proxy in front of RabbitMQ and one in front of PostgreSQL, so a test can
cut the bridge's connections the way a restart of either service would, and fake-edrone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from bridge.config import Settings
from bridge.devtools.fake_edrone import FakeEdrone
from consumers.runtime import Consumer
from tests.support.proxy import TcpProxy


async def _proxy(url: str, default_port: int) -> AsyncIterator[TcpProxy]:
    target = urlsplit(url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or default_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def amqp_proxy(settings: Settings) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the test's RabbitMQ; ``cut()`` looks like a broker restart."""
    async for proxy in _proxy(settings.amqp_url.get_secret_value(), 5672):
        yield proxy


@pytest.fixture
async def db_proxy(settings: Settings) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the test's PostgreSQL; ``cut()`` looks like a database restart."""
    async for proxy in _proxy(settings.database_url.get_secret_value(), 5432):
        yield proxy


@pytest.fixture
async def fake() -> AsyncIterator[FakeEdrone]:
    """fake-edrone on a real socket; its faults are switched by the tests."""
    async with FakeEdrone() as server:
        yield server


@pytest.fixture
def consumers_made() -> list[Consumer]:
    """The consumers a test's ``serve`` calls start, so that it can read their counters: pass
    ``started=consumers_made.append`` (the consumers are the real ones)."""
    return []
