"""The ingress against the real broker: what it accepts, what it refuses, and what it publishes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import aio_pika
import pytest
from aiohttp.test_utils import TestClient

from bridge.amqp import ROUTING_KEY_BY_CHANNEL
from bridge.app_config import AppConfig
from bridge.config import Settings
from bridge.ingress.app import create_app
from bridge.ingress.state import STATE
from bridge.publishing import PublishFailed
from bridge.signing import sign
from schemas.subscription import SubscriptionStatusChanged
from tests.support.proxy import TcpProxy
from tests.support.vectors import (
    APP_ID,
    EMAIL,
    SECRET,
    VECTOR_A,
    VECTOR_B,
    VECTOR_D,
    VECTOR_E,
    VECTORS,
)
from tests.support.webhooks import FORM, PATH, depth, form_body, json_body, queued

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings))


def signed_native5(**changes: str) -> dict[str, str]:
    fields = {**VECTOR_A, **changes}
    fields["signature"] = sign("NATIVE_5", fields, SECRET, APP_ID)
    return fields


def signed_sms(phone: str) -> dict[str, str]:
    fields = {**VECTOR_B, "phone": phone}
    fields["signature"] = sign("NATIVE_5", fields, SECRET, APP_ID)
    return fields


class TestAccepted:
    @pytest.mark.parametrize("name", sorted(VECTORS))
    @pytest.mark.parametrize("encode", [json_body, form_body], ids=["json", "form"])
    async def test_vector_is_published_normalised(
        self, client, settings, amqp_connection, name, encode
    ):
        """Every test vector of docs/protocol.md is accepted as JSON and as form, and published
        as a normalised message with message_id = event_id and the channel's routing key."""
        fields, channel, address, status, reason, protocol = VECTORS[name]
        response = await client.post(PATH, **encode(fields))
        assert response.status == 200, await response.text()
        answer = await response.json()
        assert answer["status"] == "accepted"
        [message] = await queued(settings, amqp_connection)
        event = SubscriptionStatusChanged.model_validate_json(message.body)
        assert answer["event_id"] == event.event_id == message.message_id
        assert message.routing_key == ROUTING_KEY_BY_CHANNEL[channel]
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert (event.app_id, event.channel, event.address) == (APP_ID, channel, address)
        assert (event.status, event.reason, event.protocol) == (status, reason, protocol)
        if protocol != "LEGACY_UNSUBSCRIBE":
            assert event.event_id == fields["event_id"]
            assert event.event_date_raw == fields["event_date"]
            assert event.event_date.isoformat().startswith("2024-01-15T10:30:00")

    async def test_json_and_form_give_the_same_message(self, client, settings, amqp_connection):
        """The same webhook as JSON and as form yields the same message (but received_at)."""
        for encode in (json_body, form_body):
            assert (await client.post(PATH, **encode(VECTOR_B))).status == 200
        first, second = (
            SubscriptionStatusChanged.model_validate_json(m.body).model_dump(
                exclude={"received_at"}
            )
            for m in await queued(settings, amqp_connection)
        )
        assert first == second

    async def test_json_numbers_and_nulls_sign_like_php(self, client, settings, amqp_connection):
        """JSON 1 signs as "1" and null as "" (PHP string concatenation)."""
        fields: dict[str, Any] = signed_native5(subscriber_status="", event_id="evt-json-types")
        fields.update(subscription_status_type_id=1, subscriber_status=None)
        fields["subscription_status_reason"] = 1
        response = await client.post(PATH, **json_body(fields))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        event = SubscriptionStatusChanged.model_validate_json(message.body)
        assert (event.status, event.reason) == (None, 1)

    async def test_address_is_trimmed_and_lower_cased(self, client, settings, amqp_connection):
        """The signature covers the e-mail as sent; the message carries it normalised."""
        response = await client.post(
            PATH, **form_body(signed_native5(email="  Jan.Kowalski@Example.COM ", event_id="e1"))
        )
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        assert SubscriptionStatusChanged.model_validate_json(message.body).address == EMAIL

    async def test_phone_is_published_in_e164(self, client, settings, amqp_connection):
        """The signature covers the phone as edrone typed it; the message carries it in E.164,
        the one form of a phone on both paths."""
        response = await client.post(PATH, **form_body(signed_sms("48 500 100 200")))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        event = SubscriptionStatusChanged.model_validate_json(message.body)
        assert (event.channel, event.address, event.phone) == (
            "sms",
            VECTOR_B["phone"],
            event.address,
        )

    async def test_national_phone_is_read_in_the_configured_region(
        self, aiohttp_client, make_settings, amqp_connection
    ):
        """EDRONE_BRIDGE_PHONE_REGION reads a number typed without its country code."""
        german = make_settings(phone_region="DE")
        client = await aiohttp_client(create_app(german))
        response = await client.post(PATH, **form_body(signed_sms("030 123456")))
        assert response.status == 200, await response.text()
        [message] = await queued(german, amqp_connection)
        assert SubscriptionStatusChanged.model_validate_json(message.body).address == "+4930123456"

    async def test_native4(self, client, settings, amqp_connection):
        """NATIVE_4 (no type, no phone) is read as an e-mail change."""
        fields = {k: v for k, v in VECTOR_A.items() if k not in ("subscription_status_type_id",)}
        fields.pop("phone")
        fields["signature"] = sign("NATIVE_4", fields, SECRET, APP_ID)
        response = await client.post(PATH, **form_body(fields))
        assert response.status == 200, await response.text()
        [message] = await queued(settings, amqp_connection)
        assert SubscriptionStatusChanged.model_validate_json(message.body).protocol == "NATIVE_4"

    @pytest.mark.parametrize("fields", [VECTOR_D, VECTOR_E], ids=["update", "unsubscribe"])
    async def test_legacy_callbacks_in_the_query_string(
        self, client, settings, amqp_connection, fields
    ):
        """The legacy callbacks may come as a query string with an empty body."""
        response = await client.post(f"{PATH}?{urlencode(fields)}")
        assert response.status == 200, await response.text()
        assert len(await queued(settings, amqp_connection)) == 1

    async def test_previous_secret_is_accepted_during_rotation(
        self, aiohttp_client, make_settings, amqp_connection
    ):
        """While a secret rotates, webhooks signed with the previous secret still verify."""
        rotated = make_settings(
            apps={APP_ID: AppConfig(secret="the-new-secret", previous_secret=SECRET)}
        )
        client = await aiohttp_client(create_app(rotated))
        assert (await client.post(PATH, **form_body(VECTOR_A))).status == 200
        fields = signed_native5(event_id="evt-new-secret")
        fields["signature"] = sign("NATIVE_5", fields, "the-new-secret", APP_ID)
        assert (await client.post(PATH, **form_body(fields))).status == 200
        assert len(await queued(rotated, amqp_connection)) == 2

    async def test_filtered_change_is_answered_but_not_published(
        self, aiohttp_client, make_settings, amqp_connection
    ):
        """An app syncing only unsubscribes answers "ignored" to a subscribe, storing nothing."""
        only_unsubscribes = make_settings(
            apps={APP_ID: AppConfig(secret=SECRET, sync="unsubscribe")}
        )
        client = await aiohttp_client(create_app(only_unsubscribes))
        response = await client.post(PATH, **form_body(VECTOR_B))  # a subscribe
        assert response.status == 200
        assert (await response.json())["status"] == "ignored"
        assert await depth(only_unsubscribes, amqp_connection) == 0


REJECTIONS: dict[str, tuple[dict[str, Any], int, str]] = {
    "bad signature": (
        form_body({**VECTOR_A, "signature": VECTOR_B["signature"]}),
        401,
        "bad_signature",
    ),
    "signature of another event": (
        form_body({**VECTOR_A, "event_id": "evt-999"}),
        401,
        "bad_signature",
    ),
    "unknown app": (form_body({**VECTOR_A, "app_id": "someone-else"}), 403, "unknown_app"),
    "malformed json": (
        {"data": "{not json", "headers": {"Content-Type": "application/json"}},
        400,
        "malformed_body",
    ),
    "json array": (json_body([VECTOR_A]), 400, "malformed_body"),  # type: ignore[arg-type]
    "nested json value": (json_body({**VECTOR_A, "email": {"a": 1}}), 400, "invalid_field"),
    "wrong content type": (
        {"data": urlencode(VECTOR_A), "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_content_type",
    ),
    "missing event_id": (
        form_body({k: v for k, v in VECTOR_A.items() if k != "event_id"}),
        400,
        "missing_field",
    ),
    "missing signature": (
        form_body({k: v for k, v in VECTOR_A.items() if k != "signature"}),
        400,
        "missing_field",
    ),
    "invalid e-mail": (form_body(signed_native5(email="not-an-email")), 400, "invalid_email"),
    # The old check (digits, spaces, brackets and dashes) let these through.
    "phone of no numbering plan": (form_body(signed_sms("+48 100 100 100")), 400, "invalid_phone"),
    "phone with a trunk zero": (form_body(signed_sms("(0) 500-100-200")), 400, "invalid_phone"),
    "unparseable event_date": (
        form_body(signed_native5(event_date="15/01/2024 10:30")),
        400,
        "invalid_field",
    ),
    "status out of range": (form_body(signed_native5(subscriber_status="2")), 400, "invalid_field"),
    "unknown type id": (
        form_body(signed_native5(subscription_status_type_id="3")),
        400,
        "invalid_field",
    ),
    "empty body": ({"data": b"", "headers": {"Content-Type": FORM}}, 400, "missing_field"),
}


class TestRejected:
    @pytest.mark.parametrize("case", list(REJECTIONS))
    async def test_rejection_names_the_problem_and_publishes_nothing(
        self, client, settings, amqp_connection, case
    ):
        """Bad input gets a clear error, as JSON, and nothing reaches the broker."""
        request, status, error = REJECTIONS[case]
        response = await client.post(PATH, **request)
        assert response.status == status, await response.text()
        body = await response.json()
        assert body["error"] == error
        assert body["detail"]
        assert await depth(settings, amqp_connection) == 0

    async def test_missing_fields_are_named(self, client):
        """A webhook without required fields is told which ones."""
        fields = {k: v for k, v in VECTOR_A.items() if k not in ("event_id", "event_date")}
        body = await (await client.post(PATH, **form_body(fields))).json()
        assert "event_date" in body["detail"] and "event_id" in body["detail"]

    @pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
    async def test_oversized_body(self, client, settings, amqp_connection, declared):
        """A body over the limit is refused with 413, declared or streamed."""
        oversized = urlencode({**VECTOR_A, "padding": "x" * settings.max_body_bytes})

        async def chunks() -> AsyncIterator[bytes]:
            yield oversized.encode()

        data: Any = oversized if declared else chunks()
        response = await client.post(PATH, data=data, headers={"Content-Type": FORM})
        assert response.status == 413
        assert (await response.json())["error"] == "body_too_large"
        assert await depth(settings, amqp_connection) == 0

    async def test_wrong_method(self, client):
        """GET on the webhook path is 405 with Allow, as JSON."""
        response = await client.get(PATH)
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"] == "method_not_allowed"

    async def test_version_other_than_configured(
        self, aiohttp_client, make_settings, amqp_connection
    ):
        """An app pinned to NATIVE_5 refuses an update callback signed with its secret."""
        pinned = make_settings(apps={APP_ID: AppConfig(secret=SECRET, version="NATIVE_5")})
        client = await aiohttp_client(create_app(pinned))
        response = await client.post(PATH, **form_body({**VECTOR_D, "app_id": APP_ID}))
        assert response.status == 400
        assert await depth(pinned, amqp_connection) == 0


class TestBroker:
    async def test_health_and_readiness(self, client):
        """/healthz answers while alive; /readyz while the broker channel is open."""
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200

    async def test_identical_concurrent_publishes_share_one_confirm(
        self, client, settings, amqp_connection
    ):
        """Two in-flight publishes of one event_id (edrone retrying fast) publish it once."""
        publisher = client.app[STATE].bundler.publisher
        publishes = [
            publisher.publish(b"{}", routing_key="subscription.email", message_id="evt-twice")
            for _ in range(2)
        ]
        await asyncio.gather(*publishes)
        assert await depth(settings, amqp_connection) == 1
        await publisher.publish(b"{}", routing_key="subscription.email", message_id="evt-twice")
        assert await depth(settings, amqp_connection) == 2  # not in flight: published again

    async def test_unroutable_publish_fails(self, client, settings):
        """A message no queue would take is an error, never a silent 200."""
        publisher = client.app[STATE].bundler.publisher
        with pytest.raises(PublishFailed):
            await publisher.publish(b"{}", routing_key="nowhere", message_id="evt-lost")

    async def test_broker_unreachable_then_back(
        self, aiohttp_client, make_settings, amqp_connection
    ):
        """Broker gone: 503 with Retry-After and nothing stored; broker back: accepted."""
        target = urlsplit(make_settings().amqp_url.get_secret_value())
        proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
        port = await proxy.start()
        proxied = make_settings(
            amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/", publish_timeout_s=2.0
        )
        client = await aiohttp_client(create_app(proxied))
        try:
            await proxy.cut()
            response = await client.post(PATH, **form_body(VECTOR_A))
            assert response.status == 503
            assert int(response.headers["Retry-After"]) == proxied.retry_after_s
            assert (await client.get("/readyz")).status == 503
            assert await depth(proxied, amqp_connection) == 0

            await proxy.restore()
            async with asyncio.timeout(30):
                # polling over HTTP is the point: /readyz is what ops watch
                while (await client.get("/readyz")).status != 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            response = await client.post(PATH, **form_body(VECTOR_A))
            assert response.status == 200, await response.text()
            assert await depth(proxied, amqp_connection) == 1
        finally:
            await proxy.close()

    async def test_confirm_that_never_comes(self, aiohttp_client, make_settings, amqp_connection):
        """A broker that stops answering: 503 once publish_timeout_s runs out, not a hang."""
        target = urlsplit(make_settings().amqp_url.get_secret_value())
        proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
        port = await proxy.start()
        proxied = make_settings(
            amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/", publish_timeout_s=0.5
        )
        client = await aiohttp_client(create_app(proxied))
        try:
            proxy.stall()
            async with asyncio.timeout(5):
                response = await client.post(PATH, **form_body(VECTOR_A))
            assert response.status == 503
            assert "Retry-After" in response.headers
        finally:
            proxy.resume()
            await proxy.close()


class TestMetrics:
    async def test_webhooks_are_counted_by_outcome(self, client):
        """/metrics counts webhooks received, accepted by channel, rejected by reason, and the
        publish-confirm latency, in Prometheus' text format."""
        assert (await client.post(PATH, **form_body(VECTOR_A))).status == 200
        assert (await client.post(PATH, **form_body(VECTOR_B))).status == 200
        bad = {**VECTOR_A, "signature": VECTOR_B["signature"]}
        assert (await client.post(PATH, **form_body(bad))).status == 401
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
        assert "edrone_bridge_webhooks_received_total 3.0" in text
        assert 'edrone_bridge_webhooks_accepted_total{channel="email"} 1.0' in text
        assert 'edrone_bridge_webhooks_accepted_total{channel="sms"} 1.0' in text
        assert 'edrone_bridge_webhooks_rejected_total{reason="bad_signature"} 1.0' in text
        assert "edrone_bridge_publish_confirm_seconds_count 2.0" in text
        # Two messages, one webhook each: sent one after the other, neither waited for a slot.
        assert 'edrone_bridge_ingress_bundle_webhooks_bucket{le="1.0"} 2.0' in text
        assert "edrone_bridge_ingress_bundle_webhooks_sum 2.0" in text
        assert SECRET not in text and EMAIL not in text
