"""What a process meets before it serves: a stop asked for while it is still connecting, and a
first connection that fails. Both must end the start at once and say why in one line: a
process that ignores SIGTERM while it retries is killed by its orchestrator at every stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


class Stopped(Exception):
    """A stop was asked for before the awaited step of the start was done."""


class ServiceUnreachable(ConnectionError):
    """The first connection to a service failed; the message names the service, the variable
    that sets its address, and the address (never a password)."""


async def unless_stopped(awaitable: Awaitable[_T], stopping: asyncio.Event | None) -> _T:
    """Await ``awaitable``; if ``stopping`` is set first, cancel it and raise :class:`Stopped`."""
    if stopping is None:
        return await awaitable
    if stopping.is_set():
        _close_unawaited(awaitable)
        raise Stopped
    step = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        step.cancel()
        raise
    finally:
        waiter.cancel()
    if step.done():
        return step.result()
    step.cancel()
    # A moment for the step to close what it opened; not for ever (a connect to a silent
    # service may take its own timeout to notice), and never swallowing our own cancellation.
    await asyncio.wait({step}, timeout=1.0)
    step.add_done_callback(_retrieve)
    raise Stopped


def _retrieve(step: asyncio.Future[object]) -> None:
    if not step.cancelled():
        step.exception()  # retrieved: the step's own error is moot once the start stopped


def _close_unawaited(awaitable: Awaitable[object]) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()  # a coroutine never started: no "never awaited" warning
