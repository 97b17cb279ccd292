"""``CustomerSubscriptionChanged``: the shop's own subscription change, as it publishes it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from schemas.fields import Email, Phone, PlainText, StorableText, as_utc, check_floor

SCHEMA_FILE = Path(__file__).with_name("customer_subscription_changed.schema.json")
EXAMPLE_FILE = Path(__file__).parent / "examples" / "customer_subscription_changed.json"


def _tags(value: object) -> object:
    # Either a list or edrone's own "a|b" form; stored as a list either way.
    if isinstance(value, str):
        return [tag for tag in (part.strip() for part in value.split("|")) if tag]
    return value


Status = Literal[0, 1] | None


class CustomerSubscriptionChanged(BaseModel):
    """The shop changed a customer's newsletter (and maybe SMS) subscription."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: PlainText = Field(min_length=1, max_length=255)
    # When the change was made; never before the date floor (2000-01-01 unless configured). A
    # date in the future is ordered as if no later than its consumption plus the clock skew.
    occurred_at: Annotated[datetime, AfterValidator(as_utc)]
    # Normalised as the ingress normalises edrone's: trimmed, lower-cased, the domain in
    # IDNA's Unicode form, so that one mailbox is one address on both paths.
    email: Email
    # 1 subscribed, 0 unsubscribed, null unknown; the key itself is required.
    subscriber_status: Status
    # Which edrone app (shop) the change belongs to; the only configured app when left out.
    app_id: PlainText | None = Field(default=None, min_length=1, max_length=255)
    # In E.164, as the ingress keeps edrone's phones: one phone is one SMS address on both
    # paths; without its country code it is read in the bridge's region (PHONE_REGION_CONTEXT).
    phone: Phone | None = None
    sms_subscriber_status: Status = None
    first_name: StorableText | None = Field(default=None, max_length=255)
    last_name: StorableText | None = Field(default=None, max_length=255)
    customer_tags: Annotated[list[StorableText] | None, BeforeValidator(_tags)] = None
    # Set by a shop whose change only applies one of the bridge's: the event_id of the
    # edrone.subscription.changed event that caused it. Such a change is an echo, never sent
    # back to edrone; without it the bridge matches the change to its own recent writes.
    caused_by: PlainText | None = Field(default=None, min_length=1, max_length=255)

    @field_validator("occurred_at")
    @classmethod
    def _after_floor(cls, value: datetime, info: ValidationInfo) -> datetime:
        return check_floor(value, info)


def json_schema() -> dict[str, object]:
    """The JSON Schema of the event, as shipped in ``SCHEMA_FILE``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "edrone-bridge/customer_subscription_changed.schema.json",
        **CustomerSubscriptionChanged.model_json_schema(),
    }


if __name__ == "__main__":  # regenerate the shipped file: python -m schemas.platform_event
    import json

    SCHEMA_FILE.write_text(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")
