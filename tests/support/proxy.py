"""A TCP proxy the tests put between the bridge and a service, to cut connections for real."""

from __future__ import annotations

import asyncio
import contextlib
import functools


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses new
    ones until ``restore()``, which listens on the same port again; ``stall()`` holds every
    byte until ``resume()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        # Bumped by every cut: a connection the old server accepted whose _accept runs only
        # after the cut is dropped then, not left open (a leaked transport).
        self._generation = 0

    async def start(self) -> int:
        accept = functools.partial(self._accept, self._generation)
        self._server = await asyncio.start_server(accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def cut(self) -> None:
        server, self._server = self._server, None
        self._generation += 1
        if server is not None:
            server.close()
        # Connections first: since Python 3.12 wait_closed() waits for every open one.
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def stall(self) -> None:
        """Keep every connection open but forward nothing: a broker that stops answering."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _accept(
        self, generation: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if generation != self._generation:
            writer.transport.abort()
            return
        # Held from the start, so that a cut while the upstream connection opens aborts it and
        # cancels this task.
        self._writers.add(writer)
        accepting = asyncio.current_task()
        if accepting is not None:
            self._tasks.add(accepting)
            accepting.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, asyncio.CancelledError):
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
        self._writers.discard(sink)
