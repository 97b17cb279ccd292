"""A start that cannot work fails at once, in one line that names what to fix: a URL that is not
one, a misspelt variable, no app, a service that does not answer or refuses the login. Run as
operators run it, as ``python -m bridge`` in a subprocess."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.cli import closed_port, run_cli

APPS = f"{TEST_APP_ID}:{TEST_SECRET}"
SERVING = [["run"], ["ingress"], ["consume", "subscriptions"], ["consume", "traces"], ["relay"]]


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


class TestUrls:
    @pytest.mark.parametrize(
        ("variable", "value", "example"),
        [
            ("EDRONE_BRIDGE_AMQP_URL", "localhost:5672", "amqp://guest:guest@localhost:5672/"),
            ("EDRONE_BRIDGE_AMQP_URL", "http://localhost:5672/", "amqp://"),
            ("EDRONE_BRIDGE_AMQP_URL", "amqp://", "amqp://"),
            ("EDRONE_BRIDGE_DATABASE_URL", "localhost:5432", "postgresql://postgres@localhost"),
        ],
    )
    def test_a_url_that_is_not_one_is_named_with_an_example(self, variable, value, example):
        """Checked before anything connects: exit 2 at once, naming the variable and showing
        a URL that would do (instead of a ValueError every 2 s for ever, or a traceback)."""
        started = time.monotonic()
        result = run_cli("consume", "subscriptions", EDRONE_BRIDGE_APPS=APPS, **{variable: value})
        assert result.returncode == 2
        assert time.monotonic() - started < 10
        assert variable in result.stderr and example in result.stderr
        assert "Traceback" not in result.stderr

    def test_the_password_of_a_bad_url_is_not_shown(self):
        result = run_cli("migrate", EDRONE_BRIDGE_DATABASE_URL="postgres_ql://jan:hunter2@db/x")
        assert result.returncode == 2
        assert "hunter2" not in result.stderr and "jan:***@db/x" in result.stderr


class TestVariables:
    def test_a_misspelt_variable_is_an_error_that_suggests_the_name(self):
        """EDRONE_BRIDGE_AMQP_PREFX would have left the bridge on the default queue names."""
        result = run_cli("migrate", EDRONE_BRIDGE_AMQP_PREFX="shop-a")
        assert result.returncode == 2
        assert "EDRONE_BRIDGE_AMQP_PREFX: not a setting of the bridge" in result.stderr
        assert "did you mean EDRONE_BRIDGE_AMQP_PREFIX?" in result.stderr

    def test_a_misspelt_nested_variable_is_caught_too(self):
        result = run_cli("migrate", EDRONE_BRIDGE_TRACES__RATE_LIMIT="5")
        assert result.returncode == 2
        assert "did you mean EDRONE_BRIDGE_TRACES__RATE_LIMIT_PER_S?" in result.stderr

    def test_the_tools_own_variables_are_not_settings_and_pass(self):
        """The tests' and benchmarks' variables share the prefix; the bridge leaves them be."""
        result = run_cli(
            "sign",
            "--secret=s",
            "--app-id=shop",
            "--email=jan@example.com",
            "--status=1",
            "--event-id=e-1",
            "--event-date=2024-01-15 10:30:00",
            EDRONE_BRIDGE_TEST_AMQP_URL="amqp://elsewhere/",
            EDRONE_BRIDGE_MODEL_SEED="7",
            EDRONE_BRIDGE_BENCH_DATABASE_URL="postgresql://elsewhere/x",
        )
        assert result.returncode == 0, result.stderr


class TestApps:
    @pytest.mark.parametrize("command", SERVING, ids=[" ".join(c) for c in SERVING])
    def test_a_serving_command_without_an_app_does_not_start(self, command):
        """Without an app every webhook would be 403 and every shop event dead-lettered."""
        result = run_cli(*command)
        assert result.returncode == 2
        assert "no app is configured: set EDRONE_BRIDGE_APPS=app_id:app_secret" in result.stderr


class TestFirstConnection:
    def test_an_unreachable_database_is_named(self):
        port = closed_port()
        result = run_cli(
            "consume",
            "subscriptions",
            EDRONE_BRIDGE_APPS=APPS,
            EDRONE_BRIDGE_DATABASE_URL=f"postgresql://postgres:pw@127.0.0.1:{port}/shop",
        )
        assert result.returncode == 1
        [failed] = [e for e in events(result.stderr) if e["event"] == "command_failed"]
        assert failed["error"].startswith(
            f"cannot connect to PostgreSQL at 127.0.0.1:{port}/shop (EDRONE_BRIDGE_DATABASE_URL)"
        )
        assert "pw" not in result.stderr.replace("postgres", "")

    def test_an_unreachable_broker_is_named_after_its_attempts(self, database_url):
        port = closed_port()
        result = run_cli(
            "consume",
            "traces",
            EDRONE_BRIDGE_APPS=APPS,
            EDRONE_BRIDGE_DATABASE_URL=database_url,
            EDRONE_BRIDGE_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/",
            EDRONE_BRIDGE_AMQP_CONNECT_ATTEMPTS="3",
            EDRONE_BRIDGE_AMQP_CONNECT_DELAY_S="0.1",
        )
        assert result.returncode == 1
        logged = events(result.stderr)
        assert [e["attempt"] for e in logged if e["event"] == "amqp_connect_failed"] == [1, 2, 3]
        [failed] = [e for e in logged if e["event"] == "command_failed"]
        assert failed["error"].startswith(
            f"cannot connect to RabbitMQ at 127.0.0.1:{port} vhost / (EDRONE_BRIDGE_AMQP_URL)"
        )

    def test_a_refused_broker_login_is_not_retried(self, database_url, amqp_url):
        """ACCESS_REFUSED never fixes itself: one attempt, then the error."""
        wrong = amqp_url.replace("guest:guest@", "guest:wrong@")
        assert wrong != amqp_url
        started = time.monotonic()
        result = run_cli(
            "consume",
            "traces",
            EDRONE_BRIDGE_APPS=APPS,
            EDRONE_BRIDGE_DATABASE_URL=database_url,
            EDRONE_BRIDGE_AMQP_URL=wrong,
        )
        assert result.returncode == 1
        logged = events(result.stderr)
        assert [e["attempt"] for e in logged if e["event"] == "amqp_connect_failed"] == [1]
        [failed] = [e for e in logged if e["event"] == "command_failed"]
        assert failed["error"].endswith("the broker refused the login")
        assert time.monotonic() - started < 15

    def test_a_refused_database_login_is_named(self, database_url):
        result = run_cli(
            "migrate",
            EDRONE_BRIDGE_DATABASE_URL=database_url.replace("postgres@", "nobody-here@", 1),
        )
        assert result.returncode == 1
        [failed] = [e for e in events(result.stderr) if e["event"] == "command_failed"]
        assert "(EDRONE_BRIDGE_DATABASE_URL)" in failed["error"]
        assert "nobody-here" in failed["error"]
