"""Verification and normalisation of webhook fields, without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.app_config import AppConfig
from bridge.ingress.webhook import WebhookRejected, detect_version, parse_event_date, verify_webhook
from bridge.signing import sign
from tests.support.vectors import APP_ID, EMAIL, SECRET, VECTOR_A, VECTOR_B, VECTOR_D, VECTOR_E

APPS = {APP_ID: AppConfig(secret=SECRET)}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def resign(
    fields: dict[str, str], version: str = "NATIVE_5", secret: str = SECRET
) -> dict[str, str]:
    return {**fields, "signature": sign(version, fields, secret, fields.get("app_id", APP_ID))}


def rejected(fields: dict[str, str], apps=APPS, query=None) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as info:
        verify_webhook(fields, query or {}, apps, NOW)
    return info.value


class TestEventDate:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("2024-01-15 10:30:00", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
            ("2024-01-15T10:30:00", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
            ("2024-01-15T10:30:00.123Z", datetime(2024, 1, 15, 10, 30, 0, 123000, tzinfo=UTC)),
            ("2024-01-15T12:30:00+02:00", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
            (" 2024-01-15 10:30:00 ", datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
        ],
    )
    def test_formats_edrone_sends(self, raw, expected):
        """Both formats seen from edrone parse, and a date without an offset is UTC."""
        assert parse_event_date(raw) == expected

    @pytest.mark.parametrize("raw", ["", "yesterday", "15/01/2024 10:30", "2024-13-01 10:00:00"])
    def test_unparseable_date_is_a_400(self, raw):
        """A date that is not a date is refused, naming the field."""
        with pytest.raises(WebhookRejected) as info:
            parse_event_date(raw)
        assert info.value.status == 400 and "event_date" in info.value.detail


class TestVersions:
    def test_detect_version(self):
        """auto reads the version from the fields the webhook carries."""
        native4 = {k: v for k, v in VECTOR_A.items() if k != "subscription_status_type_id"}
        assert detect_version(VECTOR_A) == "NATIVE_5"
        assert detect_version(native4) == "NATIVE_4"
        assert detect_version(VECTOR_D) == "LEGACY_UPDATE"
        assert detect_version(VECTOR_E) == "LEGACY_UNSUBSCRIBE"

    def test_native_fields_are_not_read_from_the_query_string(self):
        """Only the legacy callbacks may come in the query string."""
        error = rejected({}, query=VECTOR_A)
        assert error.status == 400

    def test_body_wins_over_query(self):
        """A field in both the body and the query string is read from the body."""
        message, _ = verify_webhook(VECTOR_D, {"event_id": "from-query"}, APPS, NOW)
        assert message.event_id == "evt-126"


class TestApps:
    def test_legacy_callback_finds_its_app_by_signature(self):
        """The update callback has no app_id: the app whose secret matches is the one."""
        apps = {"other": AppConfig(secret="other-secret"), APP_ID: AppConfig(secret=SECRET)}
        message, _ = verify_webhook(VECTOR_D, {}, apps, NOW)
        assert message.app_id == APP_ID

    def test_legacy_callback_matching_no_app_is_a_401(self):
        """A legacy callback signed by no configured secret is refused."""
        error = rejected(VECTOR_D, apps={"other": AppConfig(secret="other-secret")})
        assert (error.status, error.error) == (401, "bad_signature")

    def test_no_apps_configured_is_a_403(self):
        """With no app configured, nothing verifies."""
        assert rejected(VECTOR_D, apps={}).status == 403
        assert rejected(VECTOR_A, apps={}).status == 403

    def test_signature_from_another_secret_is_a_401(self):
        """The same fields signed with another secret are refused."""
        assert rejected(resign(VECTOR_A, secret="guess")).status == 401


class TestFields:
    def test_sms_needs_a_phone(self):
        """A type-2 (SMS) change without a phone is missing its address."""
        fields = {k: v for k, v in VECTOR_B.items() if k != "phone"}
        error = rejected(fields)
        assert (error.status, error.error) == (400, "missing_field") and "phone" in error.detail

    def test_invalid_phone(self):
        """A phone that is no phone number is refused."""
        assert rejected(resign({**VECTOR_B, "phone": "call me"})).error == "invalid_phone"

    @pytest.mark.parametrize("phone", ["(0) 500-100-200", "+48 123 456", "+48 500 100 200 ext 7"])
    def test_phone_that_is_no_valid_number_is_a_400_that_does_not_quote_it(self, phone):
        """An SMS change's phone must be a valid number (phonenumbers): otherwise 400
        invalid_phone, whose detail says why and never quotes the number."""
        error = rejected(resign({**VECTOR_B, "phone": phone}))
        assert (error.status, error.error) == (400, "invalid_phone")
        assert error.detail.startswith("phone: ")
        assert "500" not in error.detail and "456" not in error.detail

    @pytest.mark.parametrize("typed", ["48 500 100 200", "+48 500-100-200", "0048500100200"])
    def test_sms_address_is_e164(self, typed):
        """The phone edrone typed is signed as typed, and stored in its one form, E.164."""
        message, _ = verify_webhook(resign({**VECTOR_B, "phone": typed}), {}, APPS, NOW)
        assert (message.channel, message.address, message.phone) == (
            "sms",
            "+48500100200",
            "+48500100200",
        )

    def test_national_number_is_read_in_the_default_region(self):
        """Without its country code a number is read in the configured region (PL unless
        set): the same national digits are another phone in another region."""
        national = resign({**VECTOR_B, "phone": "500 100 200"})
        message, _ = verify_webhook(national, {}, APPS, NOW)
        assert message.address == "+48500100200"
        german = resign({**VECTOR_B, "phone": "030 123456"})
        message, _ = verify_webhook(german, {}, APPS, NOW, phone_region="DE")
        assert message.address == "+4930123456"

    def test_phone_beside_an_email_change_is_e164_or_left_out(self):
        """An e-mail change's phone (which its signature does not cover) is kept in E.164;
        one that is no valid number is left out rather than refusing the e-mail change."""
        typed = resign({**VECTOR_A, "phone": "48 500 100 200"})
        message, _ = verify_webhook(typed, {}, APPS, NOW)
        assert (message.channel, message.phone) == ("email", "+48500100200")
        broken = resign({**VECTOR_A, "phone": "call me"})
        message, _ = verify_webhook(broken, {}, APPS, NOW)
        assert (message.channel, message.address, message.phone) == ("email", EMAIL, None)

    def test_unknown_reason_code_is_kept(self):
        """Reason codes past the legible table are kept as numbers, without a name."""
        message, _ = verify_webhook(
            resign({**VECTOR_A, "subscription_status_reason": "42"}), {}, APPS, NOW
        )
        assert (message.reason, message.reason_name) == (42, None)

    def test_reason_is_named_per_channel(self):
        """Reason 5 is EMAIL_INCORRECT for e-mail and AGENT_SUBSCRIBED for SMS."""
        email, _ = verify_webhook(
            resign({**VECTOR_A, "subscription_status_reason": "5"}), {}, APPS, NOW
        )
        sms, _ = verify_webhook(VECTOR_B, {}, APPS, NOW)
        assert email.reason_name == "EMAIL_INCORRECT_UNSUBSCRIBED"
        assert sms.reason_name == "AGENT_SUBSCRIBED"

    def test_non_integer_reason(self):
        """A reason that is not an integer is refused."""
        assert rejected(resign({**VECTOR_A, "subscription_status_reason": "x"})).status == 400

    def test_overlong_event_id(self):
        """An event_id longer than the inbox takes is refused."""
        assert rejected(resign({**VECTOR_A, "event_id": "e" * 256})).status == 400

    def test_email_of_sms_change_is_normalised(self):
        """An SMS change keeps the e-mail edrone sent along, normalised."""
        message, _ = verify_webhook(VECTOR_B, {}, APPS, NOW)
        assert (message.channel, message.address, message.email) == ("sms", "+48500100200", EMAIL)


@given(
    st.dictionaries(st.sampled_from(sorted({*VECTOR_A, *VECTOR_D, "token"})), st.text(max_size=40))
)
@settings(max_examples=300, deadline=None)
def test_arbitrary_fields_are_accepted_or_rejected_never_crash(fields):
    """Whatever the fields, verification answers a message or a WebhookRejected, nothing else."""
    try:
        verify_webhook(fields, {}, APPS, NOW)
    except WebhookRejected as exc:
        assert 400 <= exc.status < 500
