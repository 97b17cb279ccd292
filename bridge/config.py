"""The one settings object: environment variables (prefix ``EDRONE_BRIDGE_``) over a TOML file."""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bridge.app_config import AppConfig
from bridge.part_settings import (
    RelaySettings,
    SubscriptionConsumerSettings,
    SyncSettings,
    TraceSettings,
)
from bridge.service_urls import amqp_urls, database_hosts
from bridge.variables import (
    CONFIG_FILE_VARIABLE,
    DATABASE_EXAMPLE,
    ENV_PREFIX,
    known_variables,
    shown_url,
    unknown_variables,
    variable_of,
)
from schemas.fields import DEFAULT_DATE_FLOOR, DEFAULT_PHONE_REGION, phone_region

# Read from the environment as "10.0.0.0/8, 192.0.2.7" (or a JSON list), from TOML as a list.
Networks = Annotated[tuple[IPvAnyNetwork, ...], NoDecode]


def _parse_app_pairs(value: str) -> dict[str, dict[str, str]]:
    """``"app1:secret1,app2:secret2"`` → ``{"app1": {"secret": "secret1"}, ...}``."""
    apps: dict[str, dict[str, str]] = {}
    for raw in value.split(","):
        pair = raw.strip()
        if not pair:
            continue
        app_id, sep, secret = pair.partition(":")
        if not sep or not app_id.strip() or not secret.strip():
            raise ValueError(f"{ENV_PREFIX}APPS: expected app_id:app_secret, got {app_id!r}")
        apps[app_id.strip()] = {"secret": secret.strip()}
    return apps


class _EnvSource(EnvSettingsSource):
    """Reads ``EDRONE_BRIDGE_APPS`` as comma-separated pairs, so it merges with the TOML apps."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        if field_name == "apps" and isinstance(value, str) and not value.lstrip().startswith("{"):
            return _parse_app_pairs(value)
        return super().prepare_field_value(field_name, field, value, value_is_complex)


class Settings(BaseSettings):
    """Everything the bridge reads from its environment; built once by the CLI and passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    database_url: SecretStr = SecretStr("postgresql://postgres@localhost:5432/postgres")
    # The PostgreSQL schema that holds everything the bridge owns.
    database_schema: str = Field(default="edrone_bridge", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    apps: dict[str, AppConfig] = Field(default_factory=dict)
    trace_url: str = "https://api.edrone.me/trace"

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65_535)
    webhook_path: str = Field(default="/update_subscriber_status", pattern=r"^/")
    max_body_bytes: int = Field(default=64 * 1024, ge=256)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    # Told to edrone (and to any other caller) in Retry-After when the broker cannot take a webhook.
    retry_after_s: int = Field(default=30, ge=1)
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    # A webhook's event_date (or a shop event's occurred_at) before this day is refused: no
    # clock that is right says so (400 at the ingress, dead-lettered on the trace path).
    event_date_floor: date = DEFAULT_DATE_FLOOR.date()
    # A change dated later than its receipt by more than this is ordered (newest wins) as if
    # made at receipt plus this, so that a wrong zone or clock holds an address this long at
    # most, instead of for ever; each such date is counted and logged.
    max_clock_skew_s: float = Field(default=300.0, ge=0)
    # The region (ISO 3166 code, as phonenumbers knows it) of a phone given without its
    # country code, on both paths: a webhook's or a shop's "500 100 200" is "+48500100200"
    # with PL.
    phone_region: str = DEFAULT_PHONE_REGION
    # /metrics, /healthz and /readyz of `consume subscriptions`, `consume traces` and `relay`
    # (0: any free port). Unset, each takes its own (METRICS_PORTS), so that they share a host,
    # and a second process of a kind takes a free port, logged. The ingress and `run` serve
    # them on http_port.
    metrics_port: int | None = Field(default=None, ge=0, le=65_535)
    # How often queue depths, ages and connections are sampled into the metrics.
    monitor_interval_s: float = Field(default=15.0, gt=0)
    # Set, `consume subscriptions` (and `run`) prune what is older than this many days every
    # retention_interval_s, as `edrone-bridge prune --older-than` does; unset, nothing is pruned.
    retention_days: float | None = Field(default=None, ge=1)
    retention_interval_s: float = Field(default=3600.0, gt=0)
    # Set, `consume traces` (and `run`) count every drift_interval_s the addresses where the
    # shop's mapped table and the sync state differ (as `edrone-bridge reconcile` finds them)
    # into the drift_addresses gauge; a difference younger than drift_settle_s (a change on its
    # way) is not counted. Unset, nothing is counted.
    drift_interval_s: float | None = Field(default=None, gt=0)
    drift_settle_s: float = Field(default=300.0, ge=0)
    # aiohttp's request parser limits, set explicitly: a request over one is answered 400 before
    # any handler runs. edrone sends a short request line and a handful of short headers.
    max_request_line_bytes: int = Field(default=8190, ge=256)
    max_header_bytes: int = Field(default=8190, ge=256)
    max_headers: int = Field(default=64, ge=8)
    # Slow and idle clients (a connection each, until file descriptors run out): a request head
    # must arrive within http_head_timeout_s of its first byte (or of the connection), a body
    # within http_body_timeout_s of the handler starting to read it; a keep-alive connection
    # with no new request for http_idle_timeout_s is closed (behind a load balancer, keep it
    # above the balancer's own idle timeout). Over http_max_connections open in one process,
    # a new connection gets 503 and is closed.
    http_head_timeout_s: float = Field(default=5.0, gt=0, le=300)
    http_body_timeout_s: float = Field(default=5.0, gt=0, le=300)
    http_idle_timeout_s: float = Field(default=15.0, gt=0, le=3_600)
    http_max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    # Source networks that may call the ingress; empty allows every source. /healthz and /readyz
    # stay open to all, for orchestrators.
    ingress_allowed_networks: Networks = ()
    # Peers (a load balancer in front) whose X-Forwarded-For is believed; empty: only the peer
    # address counts, and X-Forwarded-For is ignored.
    ingress_trusted_proxies: Networks = ()
    # Processes of `ingress` that share http_port (SO_REUSEPORT: the kernel spreads the
    # connections): one process tops out at one core (benchmarks/). Each has its own /metrics.
    ingress_workers: int = Field(default=1, ge=1, le=64)
    # Broker messages each ingress process waits on at once; the webhooks that come while all
    # wait go together in one message (a bundle) of at most ingress_bundle_max, with one
    # confirm for all: the broker's work per webhook is what bounds the ingress (benchmarks/).
    # At a low rate every webhook still goes alone, at once. 1 as the maximum: never bundled.
    ingress_publishes_in_flight: int = Field(default=4, ge=1, le=1_000)
    # The consumer's prefetch counts messages: it may hold this many times as many webhooks.
    ingress_bundle_max: int = Field(default=25, ge=1, le=1_000)

    # Prefix of every exchange and queue name, so several deployments (and tests) share a broker.
    amqp_prefix: str = Field(default="edrone_bridge", pattern=r"^[A-Za-z0-9_.\-]{1,100}$")
    amqp_connect_attempts: int = Field(default=10, ge=1)
    amqp_connect_delay_s: float = Field(default=2.0, ge=0)
    amqp_reconnect_interval_s: float = Field(default=2.0, gt=0)
    # In what order a process tries the nodes of a cluster's URLs: "shuffled" once per process,
    # so that replicas spread over the nodes, or as "given" (a replica beside a node lists
    # that node first). Either way each reconnect takes the next.
    amqp_node_order: Literal["shuffled", "given"] = "shuffled"
    # Replicas of every quorum queue the bridge declares (x-quorum-initial-group-size). Unset:
    # with one broker URL, the broker's default (every node, on 3.10), so that queues declared
    # before keep declaring; with several, the cluster's size up to 3, or 5 from five nodes.
    # Fixed when a queue is first declared: RabbitMQ refuses a redeclaration with another.
    amqp_quorum_group_size: int | None = Field(default=None, ge=1)
    platform_exchange: str = "platform.events"
    platform_routing_key: str = "customer.subscription.changed"
    # Where edrone's changes go for apps with publish_changes (default: platform_exchange).
    changes_exchange: str | None = None
    changes_routing_key: str = "edrone.subscription.changed"

    subscriptions: SubscriptionConsumerSettings = SubscriptionConsumerSettings()
    traces: TraceSettings = TraceSettings()
    relay: RelaySettings = RelaySettings()
    sync: SyncSettings = SyncSettings()

    @property
    def date_floor(self) -> datetime:
        """``event_date_floor`` as the UTC instant the message models compare with."""
        return datetime.combine(self.event_date_floor, time(), tzinfo=UTC)

    @property
    def clock_skew(self) -> timedelta:
        return timedelta(seconds=self.max_clock_skew_s)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("apps", mode="before")
    @classmethod
    def _apps_from_pairs(cls, value: Any) -> Any:
        # Settings(apps="a:s") in code and tests reads like the environment variable.
        if isinstance(value, str):
            return _parse_app_pairs(value)
        return value

    @field_validator("phone_region")
    @classmethod
    def _phone_region(cls, value: str) -> str:
        return phone_region(value)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        amqp_urls(value.get_secret_value())  # one broker, or a cluster's nodes, comma-separated
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        # No host is libpq's local socket (postgresql:///db); several are its multi-host form.
        url = value.get_secret_value()
        try:
            database_hosts(url)
        except ValueError:
            raise ValueError(
                f"expected a URL like {DATABASE_EXAMPLE}, got {shown_url(url)!r}"
            ) from None
        return value

    @field_validator("ingress_allowed_networks", "ingress_trusted_proxies", mode="before")
    @classmethod
    def _networks_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvSource(settings_cls)]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


# The default /metrics port of each command that has no http_port.
METRICS_PORTS = {"consume subscriptions": 9101, "consume traces": 9102, "relay": 9103}


def metrics_port(settings: Settings, command: str) -> tuple[int, bool]:
    """The port ``command`` serves /metrics on, and whether a free one may replace it."""
    if settings.metrics_port is not None:
        return settings.metrics_port, False
    return METRICS_PORTS[command], True


class ConfigError(Exception):
    """Invalid configuration; the message names each offending key."""


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment over the TOML file named by
    ``EDRONE_BRIDGE_CONFIG`` (or ``config_file``); raise :class:`ConfigError` naming bad keys."""
    path = config_file or os.environ.get(CONFIG_FILE_VARIABLE) or None
    unknown = unknown_variables(os.environ, known_variables(Settings))
    if unknown:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(unknown))
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{CONFIG_FILE_VARIABLE}: no such file: {path}")

    class _Configured(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _Configured(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except ValueError as exc:  # a malformed TOML file or APPS pair, raised by a source
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f"invalid configuration: {exc}{cause}") from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(root)"
        # The variable too, where one sets it (an app's options live in the TOML file).
        where = f" [{variable_of(key)}]" if error["loc"] and error["loc"][0] != "apps" else ""
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}{where}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
