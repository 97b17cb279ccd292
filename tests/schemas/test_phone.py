"""Phones in one form on every path: E.164 (``+48500100200``), read with the phonenumbers library;
a number without its country code is read in the default region (``EDRONE_BRIDGE_PHONE_REGION``,
``PL`` unless set); a phone that is no valid number is refused without being quoted."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.fields import (
    DEFAULT_PHONE_REGION,
    PHONE_REGION_CONTEXT,
    normalise_phone,
    phone_forms,
    phone_region,
)
from schemas.platform_event import CustomerSubscriptionChanged

E164 = "+48500100200"


def shop_event(phone: str, **context: str) -> CustomerSubscriptionChanged:
    return CustomerSubscriptionChanged.model_validate(
        {
            "event_id": "shop-1",
            "occurred_at": datetime(2026, 5, 1, tzinfo=UTC).isoformat(),
            "email": "jan@example.com",
            "subscriber_status": 1,
            "phone": phone,
            "sms_subscriber_status": 1,
        },
        context=context or None,
    )


class TestNormalisePhone:
    @pytest.mark.parametrize(
        "typed",
        [
            "+48500100200",
            "+48 500 100 200",
            "48 500 100 200",
            "48500100200",
            "0048 500-100-200",
            "+48 (500) 100 200",
            " +48500100200 ",
            "500 100 200",
        ],
    )
    def test_typed_forms_of_one_number_are_one_phone(self, typed):
        """However the number was typed, it is one phone: E.164."""
        assert normalise_phone(typed) == E164

    def test_default_region_is_poland(self):
        """edrone is Polish: a national number is read as a Polish one unless configured."""
        assert DEFAULT_PHONE_REGION == "PL"
        assert normalise_phone("500 100 200") == E164

    def test_the_region_reads_national_numbers(self):
        """A national number belongs to the configured region (Poland's national digits are
        no German number); a number with its country code is the same whatever the region."""
        assert normalise_phone("030 123456", "DE") == "+4930123456"
        with pytest.raises(ValueError, match="phone number"):
            normalise_phone("500 100 200", "DE")
        assert normalise_phone("+48 500 100 200", "DE") == E164

    @pytest.mark.parametrize(
        "broken",
        [
            "call me",
            "",
            "+48 123",
            "+48 100 100 100",
            "(0) 500-100-200",
            "+1" + "0" * 40,
            "+48 500 100 200 ext. 12",
            "48500100200#",
        ],
    )
    def test_invalid_phone_is_refused_without_quoting_it(self, broken):
        """No valid number (too short, outside every numbering plan, an extension no SMS
        reaches): ValueError saying why, never the digits it was given."""
        with pytest.raises(ValueError, match="phone number") as info:
            normalise_phone(broken)
        digits = "".join(ch for ch in broken if ch.isdigit())
        assert not digits or digits[-6:] not in str(info.value)

    def test_region_setting_is_checked(self):
        """A region is a CLDR two-letter code phonenumbers knows, any case."""
        assert phone_region("de") == "DE"
        with pytest.raises(ValueError, match="region"):
            phone_region("XX")
        with pytest.raises(ValueError, match="region"):
            phone_region("Poland")


class TestPhoneForms:
    def test_forms_a_shop_table_may_hold(self):
        """The spellings of one phone a shop's table may hold: E.164, the international form,
        digits with the country code, and in the default region also the national ones."""
        forms = phone_forms(E164, "PL")
        assert {E164, "+48 500 100 200", "48500100200", "500 100 200", "500100200"} <= set(forms)
        assert forms[0] == E164

    def test_a_phone_stored_before_normalising_is_only_itself(self):
        """A ledger phone stored as typed before this rule is matched as it is, as before."""
        assert phone_forms("48 500 100 200") == ["48 500 100 200"]

    def test_national_forms_only_in_the_default_region(self):
        """A national spelling means another number in another region: not matched there."""
        assert "500100200" not in phone_forms(E164, "DE")
        assert "030 123456" in phone_forms("+4930123456", "DE")


class TestPlatformEventPhone:
    def test_phone_is_normalised(self):
        """The shop's phone is read as the ingress reads edrone's: E.164."""
        assert shop_event("48 500 100 200").phone == E164

    def test_region_comes_from_the_validation_context(self):
        """The bridge's configured region reads the shop's national numbers."""
        assert shop_event("030 123456", **{PHONE_REGION_CONTEXT: "DE"}).phone == "+4930123456"
        assert shop_event("500 100 200").phone == E164

    def test_invalid_phone_is_refused_naming_the_field_not_the_number(self):
        """A phone that is no valid number breaks the event's contract: the error names the
        field, never the number."""
        with pytest.raises(ValidationError) as info:
            shop_event("(0) 500-100-200")
        [error] = info.value.errors(include_url=False, include_input=False)
        assert error["loc"] == ("phone",)
        assert "500" not in error["msg"]
