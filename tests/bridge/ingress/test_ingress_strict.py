"""The ingress answers 2xx only for what the consumer will apply (docs/design.md promises 1 and 7):
validly signed webhooks that could never be stored get a 400 naming the field, and nothing is
published; dates are checked against the floor; an address has one form on every path."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest

from bridge.ingress.app import create_app
from bridge.signing import php_string, sign
from schemas.subscription import SubscriptionStatusChanged
from tests.support.vectors import APP_ID, SECRET, VECTOR_A, VECTOR_D, VECTOR_E
from tests.support.webhooks import PATH, depth, form_body, json_body, queued

NATIVE_4 = {k: v for k, v in VECTOR_A.items() if k not in ("subscription_status_type_id", "phone")}
SIGNED_VERSIONS = {"NATIVE_5": VECTOR_A, "NATIVE_4": NATIVE_4, "LEGACY_UPDATE": VECTOR_D}


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


def signed(version: str = "NATIVE_5", base: dict[str, Any] | None = None, **changes: Any):
    """``base`` (the version's vector) with ``changes``, signed as PHP renders the values; the
    values stay as given (a JSON body sends ``true`` as ``true``)."""
    fields: dict[str, Any] = {**(base or SIGNED_VERSIONS[version]), **changes}
    fields.pop("signature", None)
    rendered = {key: php_string(value) for key, value in fields.items()}
    fields["signature"] = sign(version, rendered, SECRET, APP_ID)
    return fields


async def refused(client, settings, amqp_connection, request, status=400):
    """POST, check the answer is ``status`` with a JSON error and that nothing was published;
    return the error body."""
    response = await client.post(PATH, **request)
    assert response.status == status, await response.text()
    body = await response.json()
    assert await depth(settings, amqp_connection) == 0
    return body


class TestTextFields:
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("event_id", "evt\x00123"),
            ("event_date", "2024-01-15 10:30:00\x00"),
            ("email", "jan\x00@example.com"),
            ("event_id", "evt\x01"),
            ("event_id", "evt\x7f"),
            ("event_id", "evt\x85"),  # C1: NEXT LINE
            ("event_id", "evt\n"),
            ("app_id", f"{APP_ID}\x00"),
        ],
    )
    @pytest.mark.parametrize("encode", [json_body, form_body], ids=["json", "form"])
    async def test_control_character_in_a_signed_field(
        self, client, settings, amqp_connection, field, value, encode
    ):
        """A NUL or any control character in any field, validly signed, is a 400 naming the
        field (PostgreSQL could not store a NUL: the consumer would dead-letter it)."""
        body = await refused(client, settings, amqp_connection, encode(signed(**{field: value})))
        assert body["error"] == "invalid_field"
        assert repr(field) in body["detail"] and "control character" in body["detail"]

    async def test_control_character_in_an_unsigned_field(self, client, settings, amqp_connection):
        """Fields outside the signature are checked too: the phone of an e-mail change, and
        fields edrone does not send at all."""
        for extra in ({"phone": "+48\x00500"}, {"comment": "a\x1bb"}):
            body = await refused(
                client, settings, amqp_connection, form_body({**VECTOR_A, **extra})
            )
            assert body["error"] == "invalid_field", body

    async def test_lone_surrogate_in_json(self, client, settings, amqp_connection):
        """A \\ud800 escape is valid JSON but no text: 400, never a 500."""
        raw = json.dumps({**VECTOR_A, "event_id": "\ud800"})
        request = {"data": raw, "headers": {"Content-Type": "application/json"}}
        body = await refused(client, settings, amqp_connection, request)
        assert body["error"] == "malformed_body"

    async def test_form_field_that_is_not_utf8(self, client, settings, amqp_connection):
        """A percent-escape that is no UTF-8 (%FF) is a malformed body naming the field, not a
        bad signature (it used to be read as U+FFFD and fail the signature with 401)."""
        raw = urlencode(VECTOR_A).replace("evt-123", "evt-%FF")
        request = {"data": raw, "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
        body = await refused(client, settings, amqp_connection, request)
        assert body["error"] == "malformed_body"
        assert "'event_id'" in body["detail"] and "UTF-8" in body["detail"]

    async def test_query_string_that_is_not_utf8(self, client, settings, amqp_connection):
        """The legacy callbacks' query string is read with the same strictness."""
        query = urlencode(VECTOR_E).replace("%40", "%FF")
        response = await client.post(f"{PATH}?{query}")
        assert response.status == 400, await response.text()
        assert "query string" in (await response.json())["detail"]
        assert await depth(settings, amqp_connection) == 0


class TestNumbersAndStatuses:
    @pytest.mark.parametrize(
        "reason", [10**30, str(10**30), 2**31, "-2147483649", "1.5", " 1", "1_0", "+1"]
    )
    async def test_reason_outside_the_integer_range_or_not_an_integer(
        self, client, settings, amqp_connection, reason
    ):
        """subscription_status_reason must be an integer PostgreSQL's integer holds, written
        plainly: anything else is a 400 naming the field."""
        request = json_body(signed(subscription_status_reason=reason))
        body = await refused(client, settings, amqp_connection, request)
        assert "subscription_status_reason" in body["detail"]

    @pytest.mark.parametrize("reason", [2**31 - 1, "0", -1])
    async def test_reason_at_the_edges_is_kept(self, client, settings, amqp_connection, reason):
        """Every integer of the range is kept as it came (edrone's table is not all legible)."""
        response = await client.post(PATH, **json_body(signed(subscription_status_reason=reason)))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        assert SubscriptionStatusChanged.model_validate_json(message.body).reason == int(reason)

    @pytest.mark.parametrize("status", [True, False, " 1", "1 ", "01", "2", 2, 1.5, "true"])
    async def test_status_that_is_not_0_1_or_empty(self, client, settings, amqp_connection, status):
        """subscriber_status is 0, 1 or empty, as a number or a string; booleans and padded
        strings are 400 (they used to be read as 1)."""
        body = await refused(
            client, settings, amqp_connection, json_body(signed(subscriber_status=status))
        )
        assert "subscriber_status" in body["detail"]

    @pytest.mark.parametrize(
        ("status", "stored"), [(1, 1), ("1", 1), (0, 0), ("0", 0), ("", None), (None, None)]
    )
    async def test_status_as_edrone_sends_it(
        self, client, settings, amqp_connection, status, stored
    ):
        """The numbers and strings edrone sends, and its empty UNKNOWN, are accepted."""
        response = await client.post(PATH, **json_body(signed(subscriber_status=status)))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        assert SubscriptionStatusChanged.model_validate_json(message.body).status == stored


class TestIdsAndApps:
    @pytest.mark.parametrize("version", sorted(SIGNED_VERSIONS))
    @pytest.mark.parametrize("field", ["event_id", "event_date"])
    @pytest.mark.parametrize("value", ["", " ", None])
    async def test_empty_event_id_or_date(
        self, client, settings, amqp_connection, version, field, value
    ):
        """Every version that signs event_id and event_date needs both, not empty: an empty
        id would be no key for edrone's retries, an empty date no date to order by."""
        request = json_body(signed(version, **{field: value}))
        body = await refused(client, settings, amqp_connection, request)
        assert body["error"] == "missing_field"
        assert field in body["detail"]

    @pytest.mark.parametrize("version", sorted(SIGNED_VERSIONS))
    @pytest.mark.parametrize("field", ["event_id", "event_date"])
    async def test_missing_event_id_or_date(
        self, client, settings, amqp_connection, version, field
    ):
        """Missing is refused the same way, naming the field."""
        fields = {k: v for k, v in SIGNED_VERSIONS[version].items() if k != field}
        request = json_body(signed(version, base=fields))
        body = await refused(client, settings, amqp_connection, request)
        assert (body["error"], field in body["detail"]) == ("missing_field", True)

    async def test_padded_event_id(self, client, settings, amqp_connection):
        """The event_id is the inbox's key exactly as signed: padding is a 400, not trimmed
        into another event's id."""
        body = await refused(client, settings, amqp_connection, form_body(signed(event_id=" e1")))
        assert "event_id" in body["detail"]

    async def test_legacy_unsubscribe_needs_neither(self, client, settings, amqp_connection):
        """The legacy unsubscribe callback signs neither id nor date: it is accepted as it is."""
        response = await client.post(PATH, **form_body(VECTOR_E))
        assert response.status == 200, await response.text()
        assert len(await queued(settings, amqp_connection)) == 1

    @pytest.mark.parametrize("app_id", [f" {APP_ID}", f"{APP_ID} ", f"\u00a0{APP_ID}"])
    async def test_app_id_must_be_exactly_a_configured_one(
        self, client, settings, amqp_connection, app_id
    ):
        """An app_id padded with white space is a 400 naming it, even when signed with it: it
        would be stored as another app."""
        body = await refused(client, settings, amqp_connection, form_body(signed(app_id=app_id)))
        assert (body["error"], "app_id" in body["detail"]) == ("invalid_field", True)

    async def test_unknown_app(self, client, settings, amqp_connection):
        """An app that is not configured at all is still 403 unknown_app."""
        body = await refused(
            client, settings, amqp_connection, form_body(signed(app_id="other")), status=403
        )
        assert body["error"] == "unknown_app"


class TestDates:
    @pytest.mark.parametrize(
        "event_date",
        [
            "0001-01-01 00:00:00",
            "1970-01-01 00:00:00",
            "1999-12-31T23:59:59.999Z",
            "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
            "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        ],
    )
    async def test_date_that_cannot_be_true(self, client, settings, amqp_connection, event_date):
        """A date before the floor (2000-01-01), or one no UTC date can hold, is a 400 naming
        event_date; never a 500."""
        request = form_body(signed(event_date=event_date))
        body = await refused(client, settings, amqp_connection, request)
        assert "event_date" in body["detail"]

    async def test_configured_floor(self, aiohttp_client, make_settings, amqp_connection):
        """The floor is a setting (event_date_floor)."""
        settings = make_settings(event_date_floor="2024-02-01")
        client = await aiohttp_client(create_app(settings))
        body = await refused(client, settings, amqp_connection, form_body(VECTOR_A))
        assert "before 2024-02-01" in body["detail"]

    @pytest.mark.parametrize("event_date", ["2000-01-01 00:00:00", "9999-12-31 23:59:59"])
    async def test_dates_from_the_floor_on_are_accepted(
        self, client, settings, amqp_connection, event_date
    ):
        """The floor itself, and a date in the future (maybe a wrong zone: the consumer orders
        it as if no later than its receipt plus the skew), are accepted and kept as stated."""
        response = await client.post(PATH, **form_body(signed(event_date=event_date)))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        assert SubscriptionStatusChanged.model_validate_json(message.body).event_date_raw == (
            event_date
        )


class TestJsonShape:
    @pytest.mark.parametrize("depth_", [33, 1_000, 32_000])
    async def test_deep_nesting(self, client, settings, amqp_connection, depth_):
        """JSON nested deeper than the limit, however deep (32,000 used to be a 500), is a 400
        before it is parsed (objects 10,000 deep at most: 6 bytes a level, under the limit)."""
        objects = min(depth_, 10_000)
        for raw in ("[" * depth_ + "]" * depth_, '{"a":' * objects + "1" + "}" * objects):
            request = {"data": raw, "headers": {"Content-Type": "application/json"}}
            body = await refused(client, settings, amqp_connection, request)
            assert body["error"] == "malformed_body" and "deeper" in body["detail"]

    async def test_brackets_inside_strings_are_no_nesting(self, client, settings, amqp_connection):
        """Only real nesting counts: a field value full of brackets is just text."""
        fields = signed(event_id="[" * 100)
        response = await client.post(PATH, **json_body(fields))
        assert response.status == 200, await response.text()


class TestOneAddressOneRow:
    @pytest.mark.parametrize(
        "email",
        ["user@bücher.de", "user@xn--bcher-kva.de", "USER@BÜCHER.DE", " User@Xn--Bcher-Kva.De "],
    )
    async def test_idna_forms_of_a_domain_are_one_address(
        self, client, settings, amqp_connection, email
    ):
        """The e-mail's domain is normalised to IDNA's Unicode form (documented), so that the
        Unicode and the xn-- spelling of one mailbox are one ledger row."""
        response = await client.post(PATH, **form_body(signed(email=email)))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        assert SubscriptionStatusChanged.model_validate_json(message.body).address == (
            "user@bücher.de"
        )

    async def test_homoglyph_stays_another_address(self, client, settings, amqp_connection):
        """A Cyrillic ie (U+0435) in place of the Latin 'e' is another domain, and another
        address: normalising never merges what IDNA keeps apart."""
        response = await client.post(PATH, **form_body(signed(email="user@büch\u0435r.de")))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        address = SubscriptionStatusChanged.model_validate_json(message.body).address
        assert address == "user@büch\u0435r.de" and address != "user@bücher.de"
