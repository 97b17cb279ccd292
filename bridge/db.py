"""PostgreSQL access: a pool whose connections work inside the bridge's own schema."""

from __future__ import annotations

import asyncpg

from bridge.config import Settings


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
