"""What the forwarder sends and what it keeps back, decided without a server: the trace form,
and the older/echo/no-op verdicts against edrone's known state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode

import pytest
from pydantic import ValidationError

from bridge.app_config import AppConfig
from consumers.trace_form import trace_form
from consumers.trace_plan import TraceCall
from schemas.platform_event import (
    EXAMPLE_FILE,
    SCHEMA_FILE,
    CustomerSubscriptionChanged,
    json_schema,
)

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=5)


def event(**fields) -> CustomerSubscriptionChanged:
    values = {
        "event_id": "shop-1",
        "occurred_at": T0.isoformat(),
        "email": "jan@example.com",
        "subscriber_status": 1,
    }
    values.update(fields)
    return CustomerSubscriptionChanged.model_validate(values)


class TestPlatformEvent:
    def test_shipped_schema_and_example_are_current(self):
        """The JSON Schema file is what the model generates, and the example validates."""
        assert json.loads(SCHEMA_FILE.read_text()) == json_schema()
        example = CustomerSubscriptionChanged.model_validate_json(EXAMPLE_FILE.read_text())
        assert example.customer_tags == ["newsletter-form", "checkout"]

    def test_email_is_normalised_and_naive_time_is_utc(self):
        """Addresses compare like the ledger's (trimmed, lower-case); no offset means UTC."""
        parsed = event(email=" Jan@Example.COM ", occurred_at="2026-05-01 12:00:00")
        assert parsed.email == "jan@example.com"
        assert parsed.occurred_at == T0

    @pytest.mark.parametrize(
        "broken",
        [
            {"subscriber_status": 2},
            {"email": "no-at-sign"},
            {"occurred_at": "soon"},
            {"event_id": ""},
        ],
    )
    def test_contract_violations_are_refused(self, broken):
        """A status outside 0/1/null, a non-address, a non-date or an empty id breaks it."""
        with pytest.raises(ValidationError):
            event(**broken)

    def test_status_key_is_required(self):
        """subscriber_status may be null (unknown) but must be there."""
        values = {"event_id": "e", "occurred_at": T0.isoformat(), "email": "a@b.c"}
        with pytest.raises(ValidationError):
            CustomerSubscriptionChanged.model_validate(values)


def call_for(shop_event: CustomerSubscriptionChanged) -> TraceCall:
    """The call the forwarder makes for a change that wins on every address it names."""
    call = TraceCall(0, "app-1", shop_event.email, shop_event.occurred_at, event=shop_event)
    call.email_known, call.email_status = True, shop_event.subscriber_status
    if "sms_subscriber_status" in shop_event.model_fields_set:
        call.sms_known, call.sms_status = True, shop_event.sms_subscriber_status
        call.phone = shop_event.phone
    return call


class TestTraceForm:
    def form(self, shop_event, app=None, call=None):
        return trace_form(
            call or call_for(shop_event),
            app or AppConfig(secret="s"),
            platform="magento",
            platform_version="2.4.7",
            version="0.1.0",
        )

    def test_minimal_change(self):
        """An e-mail-only change carries the required fields and the integration's identity."""
        assert self.form(event()) == {
            "app_id": "app-1",
            "action_type": "subscribe",
            "sender_type": "server",
            "email": "jan@example.com",
            "subscriber_status": "1",
            "event_utc_date": "2026-05-01 12:00:00",
            "version": "0.1.0",
            "platform": "magento",
            "platform_version": "2.4.7",
        }

    def test_every_optional_field(self):
        """SMS status, phone, names and tags go along when the shop sent them."""
        form = self.form(
            event(
                subscriber_status=None,
                sms_subscriber_status=0,
                phone="+48500100200",
                first_name="Zażółć",
                last_name="Gęślą",
                customer_tags="vip| newsletter ",
            )
        )
        assert form["subscriber_status"] == ""
        assert (form["sms_subscriber_status"], form["phone"]) == ("0", "+48500100200")
        assert (form["first_name"], form["last_name"]) == ("Zażółć", "Gęślą")
        assert form["customer_tags"] == "vip|newsletter"

    def test_app_default_tags(self):
        """Without tags in the event, the app's default customer_tags are sent."""
        app = AppConfig(secret="s", customer_tags=("shop", "newsletter"))
        assert self.form(event(), app)["customer_tags"] == "shop|newsletter"
        assert "customer_tags" not in self.form(event())

    def test_sms_reconciliation_leaves_the_email_status_alone(self):
        """A trace about the SMS address alone sends no subscriber_status: an empty one would
        set edrone's e-mail status to UNKNOWN."""
        call = TraceCall(0, "app-1", "jan@example.com", T0)
        call.sms_known, call.sms_status, call.phone = True, 1, "+48500100200"
        form = self.form(event(), call=call)
        assert "subscriber_status" not in form
        assert (form["sms_subscriber_status"], form["phone"]) == ("1", "+48500100200")

    def test_values_survive_one_encoding(self):
        """Encoded once, '+' and non-ASCII come back unchanged."""
        form = self.form(event(email="jan+news@example.com", first_name="Łucja"))
        assert dict(parse_qsl(urlencode(form))) == form
