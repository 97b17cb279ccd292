"""The container healthcheck script (deploy/healthcheck.py, ``bridge-healthcheck`` in the image)
against a real HTTP server: exit 0 only for a 2xx."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.metrics import Metrics

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


class TestPrometheus:
    """deploy/prometheus: the scrape config names the Compose services and their ports, and the
    alert rules speak only of metrics the bridge exports."""

    DIR = SCRIPT.parent / "prometheus"

    def test_the_rules_use_only_metrics_the_bridge_exports(self):
        exported = set()
        for family in Metrics().registry.collect():
            suffixes = ("", "_total", "_created", "_bucket", "_sum", "_count")
            exported.update(family.name + suffix for suffix in suffixes)
        rules = yaml.safe_load((self.DIR / "alerts.yml").read_text())
        [group] = rules["groups"]
        named = set()
        for rule in group["rules"]:
            assert rule["alert"].startswith("EdroneBridge") and rule["annotations"]["summary"]
            named.update(re.findall(r"edrone_bridge_[a-z_]+", rule["expr"]))
        assert named and named <= exported, sorted(named - exported)
        assert {r["alert"] for r in group["rules"]} >= {
            "EdroneBridgeBacklogOld",
            "EdroneBridgeDeadLetters",
            "EdroneBridgeBreakerOpen",
            "EdroneBridgeServiceDisconnected",
            "EdroneBridgeWebhookSilence",
            "EdroneBridgeDrift",
        }

    def test_the_scrape_targets_are_the_compose_services(self):
        compose = yaml.safe_load((SCRIPT.parents[1] / "docker-compose.yml").read_text())
        config = yaml.safe_load((self.DIR / "prometheus.yml").read_text())
        assert config["rule_files"] == ["alerts.yml"]
        targets = [
            t
            for job in config["scrape_configs"]
            for s in job["static_configs"]
            for t in s["targets"]
        ]
        for target in targets:
            service, port = target.split(":")
            assert service in compose["services"], target
            probe = compose["services"][service]["healthcheck"]["test"]
            assert probe[-1] == port, (target, probe)

    def test_promtool_accepts_the_files(self):
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed here (the rules are checked above without it)")
        for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
            result = subprocess.run(
                [promtool, *args], cwd=self.DIR, capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stdout + result.stderr
