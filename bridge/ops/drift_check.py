"""The continuous drift check (EDRONE_BRIDGE_DRIFT_INTERVAL_S): every interval, the differing
addresses between each app's mapped table and the sync state counted per kind, with
``reconcile``'s own SQL (``bridge.ops.drift``; no export of edrone's, so edrone's side is only
judged by what the bridge knows), into the ``drift_addresses{app_id,kind}`` gauge.

Counting runs in the database and returns a handful of rows, whatever the size of the table.
Of several processes on one schema, one counts at a time (an advisory lock: the others skip
that round, and keep the figures of their own last count)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Mapping

import asyncpg
import structlog

from bridge.config import ConfigError, Settings
from bridge.db import DATABASE_ERRORS
from bridge.metrics import Metrics
from bridge.ops.drift import Comparison, count
from bridge.shop_table import ShopTarget, resolve_targets

log = structlog.get_logger(__name__)


async def count_drift(
    pool: asyncpg.Pool,
    targets: Mapping[str, ShopTarget],
    *,
    phone_region: str,
    settle_s: float | None,
) -> dict[str, Counter[str]]:
    """Differing addresses per app and kind, each app in one read-only snapshot."""
    found = {}
    async with pool.acquire() as conn:
        for app_id, target in targets.items():
            comparison = Comparison(target, phone_region, settle_s=settle_s)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                found[app_id] = await count(conn, comparison)
    return found


async def check_once(
    pool: asyncpg.Pool, settings: Settings, metrics: Metrics, *, settle_s: float | None = None
) -> dict[str, Counter[str]] | None:
    """One round: count and set the gauge; None when another process holds the lock.
    ``settle_s`` defaults to EDRONE_BRIDGE_DRIFT_SETTLE_S."""
    key = f"edrone-bridge drift {settings.database_schema}"
    async with pool.acquire() as lock:
        if not await lock.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            log.info("drift_check_skipped", reason="another process is counting")
            return None
        try:
            # Resolved each round: a table changed since the start is found as it is now.
            targets = await resolve_targets(pool, settings.apps)
            settle = settings.drift_settle_s if settle_s is None else settle_s
            found = await count_drift(
                pool, targets, phone_region=settings.phone_region, settle_s=settle
            )
        finally:
            await lock.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
    for app_id, counts in found.items():
        for kind, number in counts.items():
            metrics.drift_addresses.labels(app_id, kind).set(number)
        log.info("drift_checked", app_id=app_id, differing=sum(counts.values()))
    return found


async def check_on_schedule(
    pool: asyncpg.Pool, settings: Settings, metrics: Metrics, *, stopping: asyncio.Event
) -> None:
    """:func:`check_once` every EDRONE_BRIDGE_DRIFT_INTERVAL_S, the first one interval after
    the start, until ``stopping`` is set; a failed round is logged and tried again next time."""
    interval_s = settings.drift_interval_s
    assert interval_s is not None
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_s)
        if stopping.is_set():
            return
        try:
            await check_once(pool, settings, metrics)
        except (*DATABASE_ERRORS, ConfigError) as exc:
            log.warning("drift_check_failed", error=repr(exc))
