"""``EdroneSubscriptionChanged``: a change the bridge brought the shop to, as it publishes it on
the shop's bus (opt-in per app, ``publish_changes``), after its transaction commits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.fields import Int4, PlainText
from schemas.subscription import Channel, UtcDatetime

SCHEMA_FILE = Path(__file__).with_name("edrone_subscription_changed.schema.json")
EVENT_TYPE = "edrone.subscription.changed"


class EdroneSubscriptionChanged(BaseModel):
    """Set this customer's subscription on ``channel`` to ``subscriber_status``.

    Mostly edrone's own change; also the bridge restoring the winning change (the newest a
    person made, on either side) where the shop is known to hold another status. A change the
    shop makes because of this event should carry ``event_id`` back as its ``caused_by``: that
    is how the bridge tells the echo from a person's change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    type: Literal["edrone.subscription.changed"] = EVENT_TYPE
    # Unique per write; what the shop's resulting change names as its caused_by.
    event_id: PlainText = Field(min_length=1, max_length=255)
    app_id: PlainText = Field(min_length=1, max_length=255)
    channel: Channel
    # The e-mail or the phone (E.164), per channel, in the one form the ledger keeps.
    address: PlainText = Field(min_length=1, max_length=320)
    email: PlainText | None = Field(default=None, max_length=320)
    # 1 subscribed, 0 unsubscribed, null unknown.
    subscriber_status: Literal[0, 1] | None
    # When the winning change was made, and on which side.
    occurred_at: UtcDatetime
    origin: Literal["edrone", "shop"]
    # edrone's webhook, for a change of edrone's.
    edrone_event_id: PlainText | None = Field(default=None, max_length=255)
    reason: Int4 | None = None
    reason_name: PlainText | None = None
    published_at: UtcDatetime


def json_schema() -> dict[str, object]:
    """The JSON Schema of the event, as shipped in ``SCHEMA_FILE``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "edrone-bridge/edrone_subscription_changed.schema.json",
        **EdroneSubscriptionChanged.model_json_schema(),
    }


if __name__ == "__main__":  # regenerate the shipped file: python -m schemas.edrone_change
    import json

    SCHEMA_FILE.write_text(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")
