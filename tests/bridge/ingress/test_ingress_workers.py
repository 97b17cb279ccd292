"""``ingress`` with ``EDRONE_BRIDGE_INGRESS_WORKERS``: several processes on one port, started
and stopped together."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from bridge.devtools.simulate import build_webhook, send_webhooks
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.cli import REPO, cli_env, closed_port, run_cli, wait_until_ready


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as file:
        return [int(child) for child in file.read().split()]


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


class TestIngressWorkers:
    async def test_workers_share_the_port_and_stop_together(self, settings, tmp_path):
        """With two workers the first process starts one ``ingress --worker`` child; both serve
        the port, every webhook is accepted, and one SIGTERM stops both with exit code 0."""
        port = closed_port()
        log_path = tmp_path / "ingress.log"
        log_file = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "ingress",
            env=cli_env(
                EDRONE_BRIDGE_AMQP_URL=settings.amqp_url.get_secret_value(),
                EDRONE_BRIDGE_AMQP_PREFIX=settings.amqp_prefix,
                EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:{TEST_SECRET}",
                EDRONE_BRIDGE_HTTP_HOST="127.0.0.1",
                EDRONE_BRIDGE_HTTP_PORT=str(port),
                EDRONE_BRIDGE_INGRESS_WORKERS="2",
            ),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            await wait_until_ready(f"http://127.0.0.1:{port}", process)
            [worker] = _children(process.pid)
            async with asyncio.timeout(30):
                while log_path.read_text().count("ingress_listening") < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            bodies = [build_webhook("NATIVE_5", TEST_APP_ID, TEST_SECRET) for _ in range(40)]
            url = f"http://127.0.0.1:{port}{settings.webhook_path}"
            summary = await send_webhooks(url, bodies, concurrency=8)
            assert summary.outcomes == {"200": 40}
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
            assert not _alive(worker)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            log_file.close()

    def test_workers_need_a_fixed_port(self):
        """Several workers on port 0 would each pick a port of their own: exit 2, saying so."""
        result = run_cli(
            "ingress",
            EDRONE_BRIDGE_HTTP_PORT="0",
            EDRONE_BRIDGE_INGRESS_WORKERS="2",
            EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:{TEST_SECRET}",
        )
        assert result.returncode == 2
        assert "fixed http_port" in result.stderr
