"""The one settings object: environment variables (prefix ``EDRONE_BRIDGE_``) over a TOML file."""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
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
from bridge.variables import (
    AMQP_EXAMPLE,
    CONFIG_FILE_VARIABLE,
    DATABASE_EXAMPLE,
    ENV_PREFIX,
    check_url,
    known_variables,
    unknown_variables,
    variable_of,
)
from schemas.fields import DEFAULT_DATE_FLOOR, DEFAULT_PHONE_REGION, phone_region

# Read from the environment as "10.0.0.0/8, 192.0.2.7" (or a JSON list), from TOML as a list.
Networks = Annotated[tuple[IPvAnyNetwork, ...], NoDecode]


class ConsumerOptions(BaseModel):
    """Every number of the consumer runtime (``consumers.runtime.Consumer``), with its one
    default: batching, prefetch, retries, draining, the watchdog, the failure limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(default=500, ge=1, le=10_000)
    flush_interval_ms: int = Field(default=20, ge=1, le=60_000)
    # Unacked messages the broker may push ahead; more than one batch so that the next batch
    # fills while the previous one is handled.
    prefetch: int = Field(default=2_000, ge=1, le=65_535)
    # Broker-side poison-message guard: after this many deliveries the quorum queue
    # dead-letters the message by itself.
    delivery_limit: int = Field(default=20, ge=1)
    retry_initial_backoff_s: float = Field(default=0.5, gt=0)
    retry_max_backoff_s: float = Field(default=30.0, gt=0)
    # On stop: how long buffered batches may still finish and ack before the channel closes
    # and hands the rest back to the broker; keep it below the container's grace period.
    drain_timeout_s: float = Field(default=10.0, gt=0)
    # How often the consumer checks that the broker still delivers to it; a consumer found
    # lost at two checks in a row is registered again on fresh channels.
    watchdog_interval_s: float = Field(default=5.0, gt=0)
    # A message in this many failed batches is dead-lettered whatever the cause (docs/design.md
    # promise 7); only failures while the database answered count, so an outage does not.
    max_batch_failures: int = Field(default=10, ge=1, le=1_000)


class SubscriptionConsumerSettings(ConsumerOptions):
    """The batch applier of edrone's status changes."""

    db_batch_timeout_s: float = Field(default=30.0, gt=0)


class TraceSettings(ConsumerOptions):
    """The forwarder of the shop's changes to edrone's trace API."""

    # Each batch pays two database round trips, an ack and its last round's idle slots (about
    # 20 ms): at 100 that was a fifth of a batch of 20 ms calls (benchmarks/), at 200 a tenth.
    batch_size: int = Field(default=200, ge=1, le=10_000)
    prefetch: int = Field(default=400, ge=1, le=65_535)
    # Requests in flight to edrone at once, over every app.
    concurrency: int = Field(default=20, ge=1, le=1_000)
    # edrone's documented limit for server-side senders; 0 turns the limit off.
    rate_limit_per_s: float = Field(default=100.0, ge=0)
    # The background lane (backfill, reconcile: topology's backfill_queue) uses only what live
    # traffic leaves of each app's limit (consumers/throttle.py): live demand's recent peak
    # times the headroom stays free for it, and never less than the fraction of the limit.
    background_concurrency: int = Field(default=10, ge=1, le=1_000)
    # Smaller batches than live ones: both lanes share the event loop and the pool, and a
    # batch of 200 rows planned at once held live changes up by a p95 of 130 ms, 50 by 40 ms.
    background_batch_size: int = Field(default=50, ge=1, le=10_000)
    background_reserve_fraction: float = Field(default=0.1, ge=0, lt=1)
    background_headroom: float = Field(default=1.5, ge=1)
    # A background batch waits this long for room at most; its calls still waiting are
    # retried through the first tier (not counted), so busy live traffic cannot time it out.
    background_max_wait_s: float = Field(default=30.0, gt=0)
    # Which lanes `consume traces` consumes. Apart ("live" in one process, "background" in
    # another), a backfill takes none of live's CPU: in one process it added tens of ms to
    # live's latency on 2 cores. The rate limits are shared either way (consumers/rate_budget.py).
    lane: Literal["both", "live", "background"] = "both"
    # The niceness a process consuming only the background lane gives itself, so that the
    # machine's CPU goes to live traffic first.
    background_nice: int = Field(default=10, ge=0, le=19)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=15.0, gt=0)
    # Delay of each retry tier, in order; after the last one a message is dead-lettered.
    retry_tiers_s: tuple[float, ...] = (10.0, 60.0, 300.0, 1800.0, 7200.0)
    # Consecutive failed requests after which the forwarder stops sending for a while.
    breaker_failures: int = Field(default=10, ge=1)
    breaker_initial_pause_s: float = Field(default=1.0, gt=0)
    breaker_max_pause_s: float = Field(default=60.0, gt=0)
    db_timeout_s: float = Field(default=30.0, gt=0)
    # Sent as the trace's platform and platform_version (the shop's software, say "magento");
    # `version` is always the bridge's own.
    platform: str = "edrone-bridge"
    platform_version: str = ""

    @field_validator("retry_tiers_s")
    @classmethod
    def _tiers_ascend(cls, tiers: tuple[float, ...]) -> tuple[float, ...]:
        if not tiers or any(t <= 0 for t in tiers) or list(tiers) != sorted(set(tiers)):
            raise ValueError("retry tiers must be positive, distinct and ascending")
        return tiers


class SyncSettings(BaseModel):
    """How the two directions are kept converging (docs/design.md promise 6)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A trace edrone never acknowledged with a webhook (it changed nothing there) and a write
    # the shop never echoed are forgotten after this long.
    ack_window_s: float = Field(default=3600.0, gt=0)
    # How long after the bridge publishes a change on the shop's bus the shop has applied it:
    # a write older than that when a person changes the shop is no longer awaited as an echo
    # (for shops that do not set caused_by).
    echo_latency_s: float = Field(default=5.0, gt=0)
    # An echo follows its write; a shop change made before the write was published is a
    # person's. Raise this when the shop's clock may lag the bridge's (shops without caused_by).
    echo_clock_tolerance_s: float = Field(default=0.0, ge=0)
    # How often each consumer process looks for messages to publish after a commit (edrone's
    # changes for the shop's bus, requests to bring edrone to the winner) that another process
    # left behind; its own are published at once.
    dispatch_poll_interval_s: float = Field(default=1.0, gt=0)
    dispatch_batch_size: int = Field(default=500, ge=1, le=10_000)


class RelaySettings(BaseModel):
    """``edrone-bridge relay``: the shop's changes recorded by the outbox trigger, published."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Outbox rows read, coalesced per customer and published per transaction.
    batch_size: int = Field(default=500, ge=1, le=10_000)
    # The relay wakes on the trigger's NOTIFY; this poll is the fallback (a lost LISTEN
    # connection, another relay holding the turn) and the pause after a failed batch.
    poll_interval_s: float = Field(default=5.0, gt=0)
    # Batches failing this many times in a row while the database answers are taken apart
    # row by row, and the row that fails alone is set aside with its error.
    max_batch_failures: int = Field(default=10, ge=1, le=1_000)


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

    # Prefix of every exchange and queue name, so several deployments (and tests) share a broker.
    amqp_prefix: str = Field(default="edrone_bridge", pattern=r"^[A-Za-z0-9_.\-]{1,100}$")
    amqp_connect_attempts: int = Field(default=10, ge=1)
    amqp_connect_delay_s: float = Field(default=2.0, ge=0)
    amqp_reconnect_interval_s: float = Field(default=2.0, gt=0)
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
        check_url(value.get_secret_value(), ("amqp", "amqps"), AMQP_EXAMPLE)
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr) -> SecretStr:
        # No host is libpq's local socket (postgresql:///db).
        check_url(
            value.get_secret_value(), ("postgresql", "postgres"), DATABASE_EXAMPLE, host=False
        )
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
