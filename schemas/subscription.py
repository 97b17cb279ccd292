"""``SubscriptionStatusChanged``: one edrone status change, as the ingress publishes it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from schemas.fields import Int4, PlainText, check_floor

SCHEMA_FILE = Path(__file__).with_name("subscription_status_changed.schema.json")

Channel = Literal["email", "sms"]
Protocol = Literal["NATIVE_5", "NATIVE_4", "LEGACY_UPDATE", "LEGACY_UNSUBSCRIBE"]


def _must_be_utc(value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise ValueError("timestamp must carry a UTC offset")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it
        raise ValueError("is out of the range of dates") from None


UtcDatetime = Annotated[datetime, AfterValidator(_must_be_utc)]


def status_name(status: int | None) -> str:
    """A status as people read it: 1 subscribed, 0 unsubscribed, None (edrone's UNKNOWN)."""
    return {1: "subscribed", 0: "unsubscribed"}.get(status, "unknown")  # type: ignore[arg-type]


class SubscriptionStatusChanged(BaseModel):
    """A verified, normalised status change for one address on one channel of one app.

    The ingress builds it and the consumer reads it with the same rules (``schemas.fields``):
    whatever the ingress accepted, the consumer can store."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    app_id: PlainText = Field(min_length=1, max_length=255)
    channel: Channel
    # The e-mail (trimmed, lower-cased, its domain in IDNA's Unicode form) for the e-mail
    # channel, the phone in E.164 (``+48500100200``) for SMS: the ingress normalises both
    # (``schemas.fields``), so the consumer stores what it reads.
    address: PlainText = Field(min_length=1, max_length=320)
    # The other identifier edrone sent along, if any (the e-mail of an SMS change, say), in
    # the same form; an e-mail change's phone that is no valid number is left out.
    email: PlainText | None = Field(default=None, max_length=320)
    phone: PlainText | None = Field(default=None, max_length=64)
    # 1 subscribed, 0 unsubscribed, None when edrone has no information (its UNKNOWN).
    status: Literal[0, 1] | None
    reason: Int4 | None = None
    reason_name: PlainText | None = None
    event_id: PlainText = Field(min_length=1, max_length=255)
    # When edrone says the change happened; never before the date floor (2000-01-01 unless
    # configured). A date in the future is kept as stated: the consumer orders it as if made
    # no later than received_at plus the allowed clock skew.
    event_date: UtcDatetime
    # As received: the signature covers this exact string.
    event_date_raw: PlainText = Field(max_length=64)
    received_at: UtcDatetime
    protocol: Protocol

    @field_validator("event_date")
    @classmethod
    def _after_floor(cls, value: datetime, info: ValidationInfo) -> datetime:
        return check_floor(value, info)


def json_schema() -> dict[str, object]:
    """The JSON Schema of the message, as shipped in ``SCHEMA_FILE``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "edrone-bridge/subscription_status_changed.schema.json",
        **SubscriptionStatusChanged.model_json_schema(),
    }


if __name__ == "__main__":  # regenerate the shipped file: python -m schemas.subscription
    import json

    SCHEMA_FILE.write_text(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")
