"""The container healthcheck script (deploy/healthcheck.py, ``bridge-healthcheck`` in the image)
against a real HTTP server: exit 0 only for a 2xx."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "healthcheck.py"


async def run_check(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), *args, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


@pytest.fixture
async def server():
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "not ready"}, status=503)

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz)])
    async with TestServer(app, host="127.0.0.1") as served:
        yield served


async def test_healthy(server):
    """A 200 from /healthz on the given port is healthy (exit 0)."""
    assert await run_check(str(server.port)) == (0, "")


async def test_unhealthy_status(server):
    """Any other answer is unhealthy (exit 1), with the reason on stderr."""
    code, reason = await run_check(str(server.port), "/readyz")
    assert code == 1
    assert "503" in reason


async def test_nothing_listening(server):
    """No server on the port is unhealthy, not a traceback."""
    port = server.port
    await server.close()
    code, reason = await run_check(str(port))
    assert code == 1
    assert reason.startswith("unhealthy:")
    assert "Traceback" not in reason
