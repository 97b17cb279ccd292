"""Configuration: the documented defaults (docs/configuration.md), the TOML file, environment
variables over it, per-app options, and errors that name the offending key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.app_config import AppConfig
from bridge.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]

TOML = """
http_port = 8081
log_level = "debug"

[apps.shop1]
secret = "toml-secret"
previous_secret = "old-secret"
version = "NATIVE_4"
sync = "unsubscribe"

[apps.shop2]
secret = "second"

[subscriptions]
flush_interval_ms = 5
"""

# Runs load_settings() in a fresh interpreter, so each case sees exactly the environment given
# and nothing of the developer's shell; prints the values (secrets revealed) as JSON.
_LOADER = """
import json, sys
from bridge.config import ConfigError, load_settings
try:
    s = load_settings()
except ConfigError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
apps = {
    app_id: {
        "secret": app.secret.get_secret_value(),
        "previous_secret": app.previous_secret and app.previous_secret.get_secret_value(),
        "version": app.version,
        "sync": app.sync,
    }
    for app_id, app in s.apps.items()
}
print(json.dumps({
    "http_port": s.http_port,
    "amqp_url": s.amqp_url.get_secret_value(),
    "apps": apps,
    "subscriptions": s.subscriptions.model_dump(),
}))
"""


def load_in_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDRONE_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-c", _LOADER],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def loaded(env: dict[str, str]) -> dict:
    result = load_in_subprocess(env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def _no_bridge_environment(monkeypatch):
    """The in-process cases read only what they are given, never the developer's shell."""
    for name in list(os.environ):
        if name.startswith("EDRONE_BRIDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "bridge.toml"
    path.write_text(TOML)
    return path


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return path


class TestDefaults:
    def test_defaults_are_the_design_ones(self):
        """With nothing configured, the values are the documented defaults (the local services)."""
        settings = load_settings()
        assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
        assert (
            settings.database_url.get_secret_value()
            == "postgresql://postgres@localhost:5432/postgres"
        )
        assert settings.trace_url == "https://api.edrone.me/trace"
        assert settings.http_port == 8080
        assert settings.webhook_path == "/update_subscriber_status"
        assert settings.platform_exchange == "platform.events"
        assert settings.platform_routing_key == "customer.subscription.changed"
        assert settings.database_schema == "edrone_bridge"
        assert settings.max_body_bytes == 64 * 1024
        assert settings.apps == {}
        assert settings.phone_region == "PL"


class TestTomlFile:
    def test_file_values_and_per_app_options_are_read(self, toml_file):
        """The TOML file sets top-level values, nested groups and each app's options."""
        settings = load_settings(toml_file)
        assert settings.http_port == 8081
        assert settings.log_level == "debug"
        assert settings.subscriptions.flush_interval_ms == 5
        assert settings.subscriptions.batch_size == 500  # untouched default
        shop1 = settings.apps["shop1"]
        assert shop1.secrets() == ("toml-secret", "old-secret")
        assert (shop1.version, shop1.sync) == ("NATIVE_4", "unsubscribe")
        shop2 = settings.apps["shop2"]
        assert shop2.secrets() == ("second",)
        assert (shop2.version, shop2.sync) == ("auto", "all")

    def test_config_variable_names_the_file(self, toml_file):
        """EDRONE_BRIDGE_CONFIG points the bridge at its TOML file."""
        values = loaded({"EDRONE_BRIDGE_CONFIG": str(toml_file)})
        assert values["http_port"] == 8081
        assert values["apps"]["shop1"]["version"] == "NATIVE_4"

    def test_missing_file_is_an_error_naming_the_variable(self, tmp_path):
        """A config path that does not exist stops the start instead of running on defaults."""
        with pytest.raises(ConfigError, match="EDRONE_BRIDGE_CONFIG: no such file"):
            load_settings(tmp_path / "absent.toml")

    def test_malformed_toml_is_a_config_error(self, tmp_path):
        """A TOML syntax error is reported as invalid configuration, not a traceback."""
        with pytest.raises(ConfigError, match="invalid configuration"):
            load_settings(write_toml(tmp_path, "http_port = \n"))


class TestEnvironment:
    def test_environment_wins_over_the_file(self, toml_file):
        """An environment variable overrides the same key in the TOML file."""
        values = loaded(
            {
                "EDRONE_BRIDGE_CONFIG": str(toml_file),
                "EDRONE_BRIDGE_HTTP_PORT": "9000",
                "EDRONE_BRIDGE_AMQP_URL": "amqp://u:p@rabbit:5672/vhost",
            }
        )
        assert values["http_port"] == 9000
        assert values["amqp_url"] == "amqp://u:p@rabbit:5672/vhost"

    def test_apps_pairs_merge_with_the_file_options(self, toml_file):
        """EDRONE_BRIDGE_APPS replaces an app's secret but keeps its TOML options, and adds apps."""
        values = loaded(
            {
                "EDRONE_BRIDGE_CONFIG": str(toml_file),
                "EDRONE_BRIDGE_APPS": "shop1:env-secret, shop3:third",
            }
        )
        assert values["apps"]["shop1"] == {
            "secret": "env-secret",
            "previous_secret": "old-secret",
            "version": "NATIVE_4",
            "sync": "unsubscribe",
        }
        assert values["apps"]["shop2"]["secret"] == "second"
        assert values["apps"]["shop3"]["secret"] == "third"

    def test_apps_pairs_alone_configure_many_apps(self):
        """Without a file, comma-separated app_id:secret pairs configure every app."""
        values = loaded({"EDRONE_BRIDGE_APPS": "a:s1,b:s2"})
        assert {k: v["secret"] for k, v in values["apps"].items()} == {"a": "s1", "b": "s2"}

    def test_nested_variables_merge_with_the_file_group(self, toml_file):
        """EDRONE_BRIDGE_SUBSCRIPTIONS__BATCH_SIZE sets one value of the group, keeping the rest."""
        values = loaded(
            {
                "EDRONE_BRIDGE_CONFIG": str(toml_file),
                "EDRONE_BRIDGE_SUBSCRIPTIONS__BATCH_SIZE": "50",
            }
        )
        assert values["subscriptions"]["batch_size"] == 50
        assert values["subscriptions"]["flush_interval_ms"] == 5

    @pytest.mark.parametrize("pairs", ["nocolon", "app:", ":secret"])
    def test_malformed_apps_variable_is_named(self, pairs):
        """A malformed EDRONE_BRIDGE_APPS stops the start and the message names the variable."""
        result = load_in_subprocess({"EDRONE_BRIDGE_APPS": pairs})
        assert result.returncode == 2
        assert "EDRONE_BRIDGE_APPS" in result.stderr

    def test_bad_variable_value_is_named(self):
        """A value that does not parse names its key."""
        result = load_in_subprocess({"EDRONE_BRIDGE_HTTP_PORT": "eighty"})
        assert result.returncode == 2
        assert "http_port" in result.stderr

    def test_phone_region_is_a_known_region_in_any_case(self):
        """EDRONE_BRIDGE_PHONE_REGION takes a region code phonenumbers knows, in any case; any
        other stops the start naming the key and its variable."""
        assert Settings(phone_region="de").phone_region == "DE"
        result = load_in_subprocess({"EDRONE_BRIDGE_PHONE_REGION": "Poland"})
        assert result.returncode == 2
        assert "phone_region:" in result.stderr
        assert "EDRONE_BRIDGE_PHONE_REGION" in result.stderr


class TestInvalid:
    @pytest.mark.parametrize(
        ("toml", "key"),
        [
            ('[apps.x]\nsecret = "s"\nversion = "NATIVE_6"\n', "apps.x.version"),
            ('[apps.x]\nsecret = "s"\nsync = "some"\n', "apps.x.sync"),
            ('[apps.x]\nsecret = ""\n', "apps.x.secret"),
            ('[apps.x]\nsecret = "s"\ncolour = "red"\n', "apps.x.colour"),
            ("http_port = 70000\n", "http_port"),
            ("[subscriptions]\nbatch_size = 0\n", "subscriptions.batch_size"),
            ('log_level = "loud"\n', "log_level"),
            ('database_schema = "Robert\'); DROP"\n', "database_schema"),
            ('webhook_path = "no-slash"\n', "webhook_path"),
            ("unknown_key = 1\n", "unknown_key"),
        ],
    )
    def test_error_names_the_key(self, tmp_path, toml, key):
        """Invalid configuration stops the start with a message that names the offending key."""
        with pytest.raises(ConfigError) as caught:
            load_settings(write_toml(tmp_path, toml))
        assert f"{key}:" in str(caught.value)

    def test_every_bad_key_is_named_at_once(self, tmp_path):
        """All problems are reported together, so one run shows everything to fix."""
        with pytest.raises(ConfigError) as caught:
            load_settings(write_toml(tmp_path, 'http_port = -1\nlog_level = "loud"\n'))
        assert "http_port:" in str(caught.value)
        assert "log_level:" in str(caught.value)


class TestApps:
    def test_apps_given_as_pairs_in_code(self):
        """Settings(apps="a:s,b:t") reads like the environment variable."""
        settings = Settings(apps="a:s,b:t")
        assert {k: v.secrets() for k, v in settings.apps.items()} == {"a": ("s",), "b": ("t",)}

    def test_secrets_current_first_then_previous(self):
        """During a rotation both secrets verify; the current one is tried first."""
        app = AppConfig(secret="new", previous_secret="old")
        assert app.secrets() == ("new", "old")

    @pytest.mark.parametrize(
        ("sync", "accepted"),
        [("all", {0, 1, None}), ("subscribe", {1}), ("unsubscribe", {0})],
    )
    def test_sync_filter(self, sync, accepted):
        """The per-app sync filter passes only the changes the shop chose in edrone's panel."""
        app = AppConfig(secret="s", sync=sync)
        assert {s for s in (0, 1, None) if app.accepts_status(s)} == accepted

    def test_secrets_never_appear_in_the_settings_repr(self, toml_file):
        """Printing or logging the settings shows no secret, nor the broker password."""
        settings = load_settings(toml_file, amqp_url="amqp://user:hunter2@rabbit/")
        shown = repr(settings) + str(settings)
        for secret in ("toml-secret", "old-secret", "second", "hunter2"):
            assert secret not in shown


class TestReadme:
    """docs/configuration.md is read by people setting the bridge up: keep it true."""

    def test_every_setting_is_documented(self):
        """Each setting, nested ones included, has its EDRONE_BRIDGE_ variable in
        docs/configuration.md."""
        readme = (REPO / "docs" / "configuration.md").read_text()
        names = []
        for name, info in Settings.model_fields.items():
            nested = getattr(info.annotation, "model_fields", None)
            if name != "apps" and nested:
                names += [f"{name}__{sub}" for sub in nested]
            else:
                names.append(name)
        missing = [n for n in names if f"`EDRONE_BRIDGE_{n.upper()}`" not in readme]
        assert missing == []

    def test_toml_example_loads(self, tmp_path):
        """The documented TOML example is a valid configuration with the per-app options shown."""
        readme = (REPO / "docs" / "configuration.md").read_text()
        example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
        settings = load_settings(write_toml(tmp_path, example))
        app = settings.apps["5f3e1a2b3c4d5"]
        assert app.secrets() == ("the-current-app-secret", "the-old-secret")
        assert (app.version, app.sync) == ("NATIVE_5", "all")
