"""The shipped JSON Schema matches the message model, so other consumers can rely on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.subscription import SCHEMA_FILE, SubscriptionStatusChanged, json_schema


def test_shipped_schema_is_current():
    """schemas/subscription_status_changed.schema.json is what the model generates
    (regenerate with `python -m schemas.subscription`)."""
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()


def test_naive_timestamps_are_refused():
    """A message's timestamps carry their offset; a naive one could be read in any zone."""
    with pytest.raises(ValidationError, match="UTC offset"):
        SubscriptionStatusChanged(
            app_id="a",
            channel="email",
            address="a@example.com",
            status=1,
            event_id="e",
            event_date=datetime(2024, 1, 1),  # naive on purpose
            event_date_raw="2024-01-01 00:00:00",
            received_at=datetime.now(UTC),
            protocol="NATIVE_5",
        )


def test_round_trip():
    """What the ingress publishes, the consumer reads back unchanged."""
    message = SubscriptionStatusChanged(
        app_id="a",
        channel="sms",
        address="+48500100200",
        status=None,
        event_id="e",
        event_date=datetime(2024, 1, 1, tzinfo=UTC),
        event_date_raw="2024-01-01 00:00:00",
        received_at=datetime.now(UTC),
        protocol="NATIVE_5",
    )
    assert SubscriptionStatusChanged.model_validate_json(message.model_dump_json()) == message
