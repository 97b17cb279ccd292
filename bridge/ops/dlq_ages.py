"""What the ``dlq`` commands tell the ledger of parked messages' ages (bridge/parked.py): the
ids of the messages they removed, so that ``status`` and ``/metrics`` stop counting them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
import structlog

from bridge.config import Settings
from bridge.db import DATABASE_ERRORS
from bridge.parked import Ledger, clock, softly

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0


class Released:
    """The ids of the messages an operation removed from a DLQ, told to the ledger of parked
    messages' ages (bridge/parked.py) in chunks and at the end. Without the database the ages
    stay (the consumers' monitor forgets them once the queue is empty): a warning, no failure."""

    CHUNK = 500

    def __init__(self, ledger: Ledger | None, queue: str) -> None:
        self._ledger = ledger
        self._queue = queue
        self._ids: list[str] = []

    async def add(self, message_id: str) -> None:
        self._ids.append(message_id)
        if len(self._ids) >= self.CHUNK:
            await self.flush()

    async def flush(self) -> None:
        ids, self._ids = self._ids, []
        if self._ledger is not None and ids:
            await softly("release", self._ledger.release(self._queue, ids))

    async def now(self) -> datetime | None:
        return await clock(self._ledger)

    async def forget(self, before: datetime | None) -> None:
        if self._ledger is not None and before is not None:
            await softly("forget", self._ledger.forget([self._queue], parked_before=before))


@asynccontextmanager
async def released(settings: Settings, dlq: str) -> AsyncIterator[Released]:
    """A :class:`Released` for ``dlq`` on a connection of its own, flushed at the end."""
    try:
        conn = await asyncpg.connect(
            settings.database_url.get_secret_value(), timeout=CONNECT_TIMEOUT_S
        )
    except DATABASE_ERRORS as exc:
        log.warning("parked_ages_not_kept", queue=dlq, error=repr(exc))
        yield Released(None, dlq)
        return
    released = Released(
        Ledger(conn, timeout_s=CONNECT_TIMEOUT_S, schema=settings.database_schema), dlq
    )
    try:
        yield released
    finally:
        await released.flush()
        with contextlib.suppress(*DATABASE_ERRORS):
            await conn.close(timeout=CONNECT_TIMEOUT_S)
