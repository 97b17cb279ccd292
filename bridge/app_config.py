"""One edrone app's configuration (``[apps.<id>]``): its secret, how its webhooks are read,
what is synced, and the shop's own table it maps to (``[apps.<id>.target]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ProtocolVersion = Literal["NATIVE_5", "NATIVE_4", "LEGACY_UPDATE", "LEGACY_UNSUBSCRIBE"]
ConfiguredVersion = Literal["NATIVE_5", "NATIVE_4", "LEGACY_UPDATE", "LEGACY_UNSUBSCRIBE", "auto"]
SyncFilter = Literal["all", "subscribe", "unsubscribe"]

# A value written to a shop column: TOML gives bool, int, float or str; never SQL.
ShopValue = bool | int | float | str


class StatusValues(BaseModel):
    """How a status reads in the shop's column (Magento 1/3, booleans, 0/1...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subscribed: ShopValue
    unsubscribed: ShopValue
    # Written for edrone's UNKNOWN; left out, an UNKNOWN leaves the shop's value as it is.
    unknown: ShopValue | None = None


class TargetMapping(BaseModel):
    """The shop's own table that the subscription consumer updates (``[apps.<id>.target]``).

    Names are identifiers, never SQL: they are checked against the live catalog at start and
    quoted; values are sent as parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "newsletter_subscriber", or schema-qualified "public.ps_customer".
    table: str = Field(min_length=1)
    address_column: str = Field(min_length=1)
    email_status_column: str = Field(min_length=1)
    email_status_values: StatusValues = StatusValues(subscribed=1, unsubscribed=0)
    # SMS changes find their row by phone_column, holding any usual spelling of the phone
    # edrone sent (consumers/shop_target.py).
    sms_status_column: str | None = None
    sms_status_values: StatusValues = StatusValues(subscribed=1, unsubscribed=0)
    phone_column: str | None = None
    # Columns set to now() with every change (an updated-at column), and columns set to a
    # fixed value with every change (and on every row created).
    set_now: tuple[str, ...] = ()
    set_values: dict[str, ShopValue] = Field(default_factory=dict)
    # A date/time column of when the shop last set the status (Magento's change_status_at), if
    # the table keeps one: `backfill` and `reconcile` date the rows they read by it.
    changed_at_column: str | None = None
    # edrone promises that the sync creates no profiles: unknown addresses are counted as
    # unknown_customer unless this is true, which inserts a row.
    create_missing: bool = False

    @field_validator(
        "table",
        "address_column",
        "email_status_column",
        "sms_status_column",
        "phone_column",
        "changed_at_column",
    )
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("contains a NUL character")
        return value

    @model_validator(mode="after")
    def _sms_needs_phone(self) -> TargetMapping:
        if self.sms_status_column is not None and self.phone_column is None:
            raise ValueError("sms_status_column needs phone_column (SMS rows are found by phone)")
        return self

    def columns(self) -> dict[str, str]:
        """Every mapped column, by the option that names it (for validation messages)."""
        named = {
            "address_column": self.address_column,
            "email_status_column": self.email_status_column,
            "sms_status_column": self.sms_status_column,
            "phone_column": self.phone_column,
            "changed_at_column": self.changed_at_column,
        }
        found = {option: name for option, name in named.items() if name is not None}
        found.update({f"set_now.{name}": name for name in self.set_now})
        found.update({f"set_values.{name}": name for name in self.set_values})
        return found


class AppConfig(BaseModel):
    """One edrone app (shop): its secret and how its webhooks are read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    secret: SecretStr = Field(min_length=1)
    # Accepted as well as `secret` while a rotation is under way.
    previous_secret: SecretStr | None = None
    version: ConfiguredVersion = "auto"
    sync: SyncFilter = "all"
    # Sent as the trace's customer_tags when the shop's event carries none (newer edrone docs
    # mark the field required for subscribe).
    customer_tags: tuple[str, ...] = ()
    # Trace requests per second for this app; None takes traces.rate_limit_per_s.
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    # The shop's own table to apply edrone's changes to (and to relay the shop's changes from).
    target: TargetMapping | None = None
    # Publish each change the bridge brings the shop to as an edrone.subscription.changed
    # event on changes_exchange, for shops whose services listen to events rather than read
    # tables; the shop's resulting change should carry its event_id back as caused_by.
    publish_changes: bool = False
    # The shop sets caused_by on every change it makes because of one of those events: a
    # change without it is then a person's. Left false, the bridge finds echoes among its own
    # writes (the write a change follows, with its status).
    shop_names_causes: bool = False

    def secrets(self) -> tuple[str, ...]:
        current = self.secret.get_secret_value()
        if self.previous_secret is None:
            return (current,)
        return (current, self.previous_secret.get_secret_value())

    def accepts_status(self, status: int | None) -> bool:
        """The per-app sync filter chosen in edrone's panel: which changes are synced."""
        if self.sync == "all":
            return True
        return status == (1 if self.sync == "subscribe" else 0)
