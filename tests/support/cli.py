"""The ``edrone-bridge`` command run as a subprocess, from the repository root, with a clean
environment."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parents[2]


def cli_env(**variables: str) -> dict[str, str]:
    """The current environment without any EDRONE_BRIDGE_ setting, plus ``variables``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDRONE_BRIDGE_")}
    return {**clean, **variables}


def run_cli(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env=cli_env(**variables),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run_cli_async(*args: str, **variables: str) -> tuple[int, str, str]:
    """The CLI in a subprocess while this test's event loop keeps serving its own server."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        env=cli_env(**variables),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until_ready(base_url: str, process: asyncio.subprocess.Process) -> None:
    """Poll ``/readyz`` until it answers 200; fail if the process exits or 30 s pass."""
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            assert process.returncode is None, "the bridge exited before it was ready"
            try:
                async with session.get(f"{base_url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    pytest.fail("the bridge was not ready within 30 s")
