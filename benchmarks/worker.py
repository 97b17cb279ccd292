"""A worker process for a benchmark's own clients (raw publisher, raw consumer, the consumer
under test): coroutines run there on a loop of their own, away from the harness's."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bridge.cli.main import event_loop_factory

_T = TypeVar("_T")


def quiet() -> None:
    """structlog's default prints every debug line; the benchmarks want warnings only."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _run(func: Callable[..., Coroutine[Any, Any, _T]], args: tuple[Any, ...]) -> _T:
    # The bridge's own choice of loop, so that baselines and the code under test share it.
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(func(*args))


async def ping() -> int:
    """The worker's pid (and the first call starts the process)."""
    import os

    return os.getpid()


class Worker:
    """One long-lived process (imports paid once) that runs one coroutine at a time."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=quiet
        )

    async def run(self, func: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
        future = self._pool.submit(_run, func, args)
        return await asyncio.wrap_future(future)

    def pid(self) -> int | None:
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
