"""Real services for every test: RabbitMQ and PostgreSQL from the environment, the local
defaults, or testcontainers where Docker runs; never a silent skip.

Each test gets its own exchange/queue prefix and its own PostgreSQL schema, removed afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest

from bridge.amqp import topology
from bridge.app_config import AppConfig
from bridge.config import Settings
from bridge.migrate import migrate
from tests.support.apps import TEST_APP_ID, TEST_SECRET

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 3
        ):
            return True
    except OSError:
        return False


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    return result.returncode == 0


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("EDRONE_BRIDGE_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    if _answers(url, 5672):
        yield url
        return
    if not _docker_runs():
        pytest.fail(f"RabbitMQ does not answer at {url} and Docker is not available", False)
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        params = container.get_connection_params()
        yield (
            f"amqp://guest:guest@{params.host}:{params.port}/"  # type: ignore[attr-defined]
        )


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("EDRONE_BRIDGE_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    if _answers(url, 5432):
        yield url
        return
    if not _docker_runs():
        pytest.fail(f"PostgreSQL does not answer at {url} and Docker is not available", False)
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:15", driver=None) as container:
        yield container.get_connection_url()


@pytest.fixture
async def make_settings(amqp_url: str, database_url: str) -> AsyncIterator[Callable[..., Settings]]:
    """Settings for one test: unique AMQP prefix and schema, one app with the test-vector secret.

    Whatever the test's settings created (queues, exchanges, schema) is deleted afterwards."""
    suffix = uuid.uuid4().hex[:12]
    made: list[Settings] = []

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": amqp_url,
            "database_url": database_url,
            "amqp_prefix": f"test_{suffix}",
            "platform_exchange": f"test_{suffix}.platform",
            "database_schema": f"test_{suffix}",
            "apps": {TEST_APP_ID: AppConfig(secret=TEST_SECRET)},
            "amqp_connect_attempts": 1,
            "amqp_reconnect_interval_s": 0.5,
            "http_port": 0,
            "metrics_port": 0,
        }
        values.update(overrides)
        made.append(Settings(**values))
        return made[-1]

    yield make
    # Clean up through the real services, not through overrides that may point at a proxy.
    cleanup = {
        (s.amqp_prefix, s.database_schema, s.platform_exchange, s.traces.retry_tiers_s)
        for s in made
    }
    for prefix, schema, platform_exchange, tiers in cleanup:
        base = Settings(
            amqp_url=amqp_url,
            database_url=database_url,
            amqp_prefix=prefix,
            database_schema=schema,
            platform_exchange=platform_exchange,
            traces={"retry_tiers_s": tiers},
        )
        await remove_amqp(base)
        await _drop_schema(base)


@pytest.fixture
def measured(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Prints a line of measured figures past pytest's capture (the bridge's logs stay
    captured), so that every run, CI's included, shows what the test observed."""

    def show(line: str) -> None:
        with capsys.disabled():
            print("\n" + line)

    return show


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The test's settings (see ``make_settings``)."""
    return make_settings()


async def remove_amqp(settings: Settings) -> None:
    """Delete every queue and exchange of the settings' deployment (and its platform exchange)."""
    names = topology(settings)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in names.queues(settings.traces.retry_tiers_s):
            # quorum queues refuse if_unused=True (the connection would be closed)
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
        for exchange in [*names.exchanges(), settings.platform_exchange]:
            await channel.exchange_delete(exchange, if_unused=False)


async def _drop_schema(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def amqp_connection(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain connection for the test's own checks (queue depths, publishing raw messages)."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        yield connection


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside the test's migrated schema."""
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=10,
        server_settings={"search_path": f'"{settings.database_schema}", public'},
    )
    try:
        await migrate(conn, settings.database_schema)
        yield conn
    finally:
        await conn.close()
