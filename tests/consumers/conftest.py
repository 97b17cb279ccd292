"""Consumer fixtures: fast settings, a broker with the topology declared, a database pool and
a consumer factory (helpers live in ``support.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import asyncpg
import pytest

from bridge.amqp import declare_topology, declare_trace_topology
from bridge.config import Settings
from bridge.db import create_pool
from bridge.devtools.fake_edrone import FakeEdrone
from bridge.part_settings import SubscriptionConsumerSettings
from consumers import subscriptions
from consumers.runtime import Consumer
from consumers.service import consumer_of
from tests.support.consumers import TRACE_FAST

# Small batches and short waits, so that every test runs in well under a second or two.
FAST = {
    "batch_size": 20,
    "flush_interval_ms": 20,
    "prefetch": 100,
    "db_batch_timeout_s": 5.0,
    "retry_initial_backoff_s": 0.05,
    "retry_max_backoff_s": 0.2,
    "drain_timeout_s": 5.0,
}


@pytest.fixture
def make_consumer_settings(
    settings: Settings, make_settings: Callable[..., Settings]
) -> Callable[..., Settings]:
    """Settings with the test's prefix and schema (cleaned up through ``settings``) and fast
    consumer options; keyword arguments override consumer options, ``apps`` the apps."""

    def make(*, apps: Any = None, **subscriptions: Any) -> Settings:
        extra = {"apps": apps} if apps is not None else {}
        return make_settings(
            subscriptions=SubscriptionConsumerSettings(**{**FAST, **subscriptions}), **extra
        )

    return make


@pytest.fixture
def fast_settings(make_consumer_settings: Callable[..., Settings]) -> Settings:
    return make_consumer_settings()


@pytest.fixture
async def broker(
    amqp_connection: aio_pika.abc.AbstractConnection, settings: Settings
) -> aio_pika.abc.AbstractConnection:
    """The test's connection, with the deployment's exchanges and queues declared."""
    channel = await amqp_connection.channel()
    async with channel:
        await declare_topology(channel, settings)
    return amqp_connection


@pytest.fixture
async def pool(db: asyncpg.Connection, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A bridge pool inside the test's migrated schema."""
    value = await create_pool(settings, command_timeout_s=settings.subscriptions.db_batch_timeout_s)
    yield value
    await asyncio.wait_for(value.close(), 10)


@pytest.fixture
async def make_consumer(
    broker: aio_pika.abc.AbstractConnection, pool: asyncpg.Pool, fast_settings: Settings
) -> AsyncIterator[Callable[..., Awaitable[Consumer]]]:
    """The subscription consumer for given settings (the fast ones by default), built as
    ``consume subscriptions`` builds it, its dispatcher running until the test ends; the test
    enters it with ``async with``, which closes its channels."""
    async with AsyncExitStack() as built:

        async def make(settings: Settings | None = None) -> Consumer:
            part = consumer_of(subscriptions.PART, settings or fast_settings, broker, pool)
            return await built.enter_async_context(part)

        yield make


@pytest.fixture
async def fake() -> AsyncIterator[FakeEdrone]:
    """fake-edrone on a real socket; its faults are switched by the tests."""
    async with FakeEdrone() as server:
        yield server


@pytest.fixture
def make_traces(make_settings, fake, amqp_connection, db):
    """Settings aimed at the fake, with TRACE_FAST options overridden by keyword arguments
    (``apps`` replaces the apps), and the trace topology declared; the schema is migrated."""

    async def make(*, apps=None, **traces):
        extra = {"apps": apps} if apps is not None else {}
        settings = make_settings(trace_url=fake.url, traces={**TRACE_FAST, **traces}, **extra)
        channel = await amqp_connection.channel()
        async with channel:
            await declare_trace_topology(channel, settings)
        return settings

    return make
