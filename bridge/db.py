"""PostgreSQL access: a pool whose connections work inside the bridge's own schema."""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from bridge.config import Settings
from bridge.service_urls import database_address
from bridge.starting import ServiceUnreachable, unless_stopped

log = structlog.get_logger(__name__)


async def create_pool(
    settings: Settings,
    *,
    command_timeout_s: float,
    min_size: int = 1,
    max_size: int = 4,
    stopping: asyncio.Event | None = None,
) -> asyncpg.Pool:
    """A pool whose sessions resolve unqualified names in ``settings.database_schema`` first;
    ``command_timeout_s`` bounds each statement (the caller's own setting). A database that
    cannot be reached, or refuses the login, is :class:`ServiceUnreachable` at once, naming it;
    a stop asked for meanwhile is :class:`Stopped`."""
    url = settings.database_url.get_secret_value()
    try:
        pool = await unless_stopped(
            asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=10,
                command_timeout=command_timeout_s,
                server_settings={
                    "search_path": f'"{settings.database_schema}", public',
                    "application_name": "edrone-bridge",
                },
            ),
            stopping,
        )
    except CONNECT_ERRORS as exc:
        raise unreachable(url, exc) from exc
    assert pool is not None
    return pool


# A first connection that fails for a reason about where or who: no use retrying in a loop.
CONNECT_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.CannotConnectNowError,
)


def unreachable(url: str, exc: BaseException) -> ServiceUnreachable:
    """The one-line error of a failed first connection to PostgreSQL at ``url``."""
    why = "no answer within 10 s" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
    return ServiceUnreachable(
        f"cannot connect to PostgreSQL at {database_address(url)} "
        f"(EDRONE_BRIDGE_DATABASE_URL): {why}"
    )


async def close_pool(pool: asyncpg.Pool, timeout_s: float) -> None:
    """Close gracefully within ``timeout_s``, then by force."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        log.warning("db_pool_close_timeout", timeout_s=timeout_s)
        pool.terminate()


# What a database error says about a batch (docs/design.md promise 7):
UNAVAILABLE = "unavailable"  # the database was not reached or went away: nothing was tried
TRANSIENT = "transient"  # reached, but the same work may well succeed again (a deadlock, say)
CONTENT = "content"  # may lie in one message's content: find it, dead-letter it alone

# SQLSTATE classes of errors that a value in the work can cause: cardinality (21), data (22),
# integrity (23), invalid SQL statement name (26), routine and trigger exceptions (2F, 38, 39,
# 09, P0, a shop's own trigger raising), program limits (54, an index row too large).
_CONTENT_CLASSES = frozenset({"21", "22", "23", "26", "2F", "38", "39", "09", "54", "P0"})
# Reached, then gone or refusing: shutdown, crash, starting up, dropped; too many connections.
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "57P04", "53300"})


def classify(exc: BaseException) -> str:
    """UNAVAILABLE, TRANSIENT or CONTENT. Any error that is not PostgreSQL's or a connection's
    (an encoding error, a value asyncpg cannot decode) came from the work itself: CONTENT."""
    if isinstance(exc, TimeoutError):  # before OSError, its base: the probe tells which it was
        return TRANSIENT
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", but also a misuse of the client (a statement given the wrong
        # number of arguments): retried, counted only while the database answers (the probe).
        return TRANSIENT
    if isinstance(exc, OSError | asyncpg.PostgresConnectionError):
        return UNAVAILABLE
    if not isinstance(exc, asyncpg.PostgresError):
        return CONTENT
    state = exc.sqlstate or ""
    if state in _UNAVAILABLE_STATES:
        return UNAVAILABLE
    if state[:2] in _CONTENT_CLASSES:
        return CONTENT
    return TRANSIENT


# Every way a database call fails that is about the service or the statement, not the code:
# what a caller that reports instead of raising (status, the monitor, the relay's listener)
# catches. Which of them are worth retrying is classify()'s answer.
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def answers(pool: asyncpg.Pool, timeout_s: float) -> bool:
    """Whether the database answers a trivial query now (a failure's cause: it or the work)."""
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await pool.fetchval("SELECT 1"))
    except Exception:  # any failure to answer means no
        return False
