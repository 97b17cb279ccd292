"""The contract of edrone's changes on the shop's bus: the shipped JSON Schema matches the model,
and what the bridge publishes reads back unchanged."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from schemas.edrone_change import SCHEMA_FILE, EdroneSubscriptionChanged, json_schema


def test_shipped_schema_is_current():
    """schemas/edrone_subscription_changed.schema.json is what the model generates
    (regenerate with `python -m schemas.edrone_change`)."""
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()


def test_round_trip():
    """The event names the write a shop echoes back as caused_by, and survives JSON."""
    event = EdroneSubscriptionChanged(
        event_id="9b1f7c1e-5d1a-4f0e-8f0e-3c6a8b3f2d10",
        app_id="a",
        channel="email",
        address="jan@example.com",
        email="jan@example.com",
        subscriber_status=0,
        occurred_at=datetime(2026, 5, 1, 12, tzinfo=UTC),
        origin="edrone",
        edrone_event_id="evt-1",
        published_at=datetime.now(UTC),
    )
    assert EdroneSubscriptionChanged.model_validate_json(event.model_dump_json()) == event
    assert event.type == "edrone.subscription.changed"
