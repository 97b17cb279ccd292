"""PostgreSQL access: a pool whose connections work inside the bridge's own schema."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from bridge.config import Settings

log = structlog.get_logger(__name__)


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A pool whose sessions resolve unqualified names in ``settings.database_schema`` first."""
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=min_size,
        max_size=max_size,
        timeout=10,
        command_timeout=settings.subscriptions.db_batch_timeout_s,
        server_settings={
            "search_path": f'"{settings.database_schema}", public',
            "application_name": "edrone-bridge",
        },
    )
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool, timeout_s: float) -> None:
    """Close gracefully within ``timeout_s``, then by force."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        log.warning("db_pool_close_timeout", timeout_s=timeout_s)
        pool.terminate()
