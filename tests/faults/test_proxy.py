"""The proxy the fault tests cut: a cut must drop every connection it holds, including one whose
upstream connection is still being opened, or a test's "outage" leaves a live path behind (and
a transport nobody closes, which pytest reports as an unraisable ResourceWarning)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

from tests.support.proxy import TcpProxy


@contextlib.contextmanager
def upstream_that_never_accepts() -> Iterator[int]:
    """A listening socket whose backlog is full: a connect to it hangs in SYN retries."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


async def test_a_cut_drops_a_connection_whose_upstream_is_still_opening():
    with upstream_that_never_accepts() as port:
        proxy = TcpProxy("127.0.0.1", port)
        await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            await asyncio.sleep(0.3)  # the proxy has accepted and waits on the upstream
            await proxy.cut()
            try:
                async with asyncio.timeout(3):
                    dropped = await reader.read() == b""
            except ConnectionResetError:
                dropped = True
            assert dropped
        finally:
            writer.transport.abort()
            await proxy.close()
