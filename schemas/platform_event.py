"""``CustomerSubscriptionChanged``: the shop's own subscription change, as it publishes it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

SCHEMA_FILE = Path(__file__).with_name("customer_subscription_changed.schema.json")
EXAMPLE_FILE = Path(__file__).parent / "examples" / "customer_subscription_changed.json"


def _as_utc(value: datetime) -> datetime:
    # A shop that leaves out the offset means UTC, as edrone's own dates do.
    if value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _normalise_email(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _tags(value: object) -> object:
    # Either a list or edrone's own "a|b" form; stored as a list either way.
    if isinstance(value, str):
        return [tag for tag in (part.strip() for part in value.split("|")) if tag]
    return value


Status = Literal[0, 1] | None


class CustomerSubscriptionChanged(BaseModel):
    """The shop changed a customer's newsletter (and maybe SMS) subscription."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: str = Field(min_length=1, max_length=255)
    occurred_at: Annotated[datetime, AfterValidator(_as_utc)]
    email: Annotated[
        str,
        BeforeValidator(_normalise_email),
        Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$"),
    ]
    # 1 subscribed, 0 unsubscribed, null unknown; the key itself is required.
    subscriber_status: Status
    # Which edrone app (shop) the change belongs to; the only configured app when left out.
    app_id: str | None = Field(default=None, min_length=1, max_length=255)
    phone: str | None = Field(default=None, max_length=64)
    sms_subscriber_status: Status = None
    first_name: str | None = Field(default=None, max_length=255)
    last_name: str | None = Field(default=None, max_length=255)
    customer_tags: Annotated[list[str] | None, BeforeValidator(_tags)] = None


def json_schema() -> dict[str, object]:
    """The JSON Schema of the event, as shipped in ``SCHEMA_FILE``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "edrone-bridge/customer_subscription_changed.schema.json",
        **CustomerSubscriptionChanged.model_json_schema(),
    }
