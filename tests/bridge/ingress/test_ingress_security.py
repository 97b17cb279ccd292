"""The ingress's limits on who may call it and how large a request's head may be, over real HTTP
against the real broker: a refused request publishes nothing."""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_network
from urllib.parse import urlencode

import pytest

from bridge.ingress.allowlist import parse_address, source_address
from bridge.ingress.app import create_app
from bridge.ingress.state import METRICS
from tests.support.vectors import VECTOR_A, VECTOR_B, VECTOR_D
from tests.support.webhooks import EDRONE, FORM, PATH, PROXY, depth, form_body

LOCAL = ip_network("127.0.0.0/8")
ELSEWHERE = ip_network("10.0.0.0/8")


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


class TestSourceAddress:
    @pytest.mark.parametrize(
        ("peer", "forwarded_for", "trusted", "source"),
        [
            ("198.51.100.1", [], [], "198.51.100.1"),
            ("198.51.100.1", ["203.0.113.7"], [], "198.51.100.1"),
            ("198.51.100.1", ["203.0.113.7"], [ELSEWHERE], "198.51.100.1"),
            ("127.0.0.1", ["203.0.113.7"], [PROXY], "203.0.113.7"),
            ("127.0.0.1", ["203.0.113.7, 10.1.2.3"], [PROXY, ELSEWHERE], "203.0.113.7"),
            ("127.0.0.1", ["203.0.113.7", "10.1.2.3"], [PROXY, ELSEWHERE], "203.0.113.7"),
            ("127.0.0.1", ["203.0.113.7, 198.51.100.1"], [PROXY], "198.51.100.1"),
            ("127.0.0.1", ["10.1.2.3"], [PROXY, ELSEWHERE], "10.1.2.3"),
            ("127.0.0.1", [], [PROXY], "127.0.0.1"),
            ("127.0.0.1", ["203.0.113.7:4711"], [PROXY], "203.0.113.7"),
            ("127.0.0.1", ["[2001:db8::7]:443"], [PROXY], "2001:db8::7"),
            ("::1", [" 2001:db8::7 "], [ip_network("::1/128")], "2001:db8::7"),
            ("::ffff:127.0.0.1", [], [], "127.0.0.1"),
            ("198.51.100.1", ["not an address"], [], "198.51.100.1"),
        ],
        ids=[
            "peer",
            "header from an untrusted peer is ignored",
            "header from a peer outside the trusted networks is ignored",
            "header from a trusted proxy",
            "past a chain of trusted proxies",
            "several header lines are one list",
            "a hop prepended by the client is not believed",
            "every hop trusted: the farthest",
            "trusted proxy without the header",
            "hop with a port",
            "bracketed IPv6 hop with a port",
            "IPv6 peer and hop",
            "IPv4-mapped peer reads as IPv4",
            "garbage from an untrusted peer is ignored",
        ],
    )
    def test_source(self, peer, forwarded_for, trusted, source):
        """X-Forwarded-For is believed only as far as trusted proxies wrote it."""
        assert source_address(peer, forwarded_for, trusted) == ip_address(source)

    @pytest.mark.parametrize(
        "forwarded_for", [["unknown"], ["203.0.113.7,,"], ["[2001:db8::1"], ["203.0.113.7 x"]]
    )
    def test_garbled_header_from_a_trusted_proxy_refuses(self, forwarded_for):
        """A trusted proxy's header that cannot be read is an error, never a guess."""
        with pytest.raises(ValueError):
            source_address("127.0.0.1", forwarded_for, [PROXY])

    @pytest.mark.parametrize("peer", ["", "/run/bridge.sock", "localhost"])
    def test_unreadable_peer_refuses(self, peer):
        """A peer that is no IP address (a Unix socket, say) is not guessed at either."""
        with pytest.raises(ValueError):
            parse_address(peer)


def refused_count(client) -> float:
    registry = client.app[METRICS].registry
    labels = {"reason": "forbidden_source"}
    return registry.get_sample_value("edrone_bridge_webhooks_rejected_total", labels) or 0.0


class TestAllowList:
    async def test_allowed_peer_is_served(self, aiohttp_client, make_settings, amqp_connection):
        """A webhook from an allowed network is accepted and published as usual."""
        settings = make_settings(ingress_allowed_networks=[LOCAL])
        client = await aiohttp_client(create_app(settings))
        response = await client.post(PATH, **form_body(VECTOR_A))
        assert response.status == 200, await response.text()
        assert await depth(settings, amqp_connection) == 1

    async def test_refused_peer(self, aiohttp_client, make_settings, amqp_connection):
        """A source outside the allow-list gets 403 forbidden_source, before its body is read
        (an oversized one is not even measured), and nothing is published."""
        settings = make_settings(ingress_allowed_networks=[EDRONE, ELSEWHERE])
        client = await aiohttp_client(create_app(settings))
        response = await client.post(PATH, **form_body(VECTOR_A))
        assert response.status == 403
        body = await response.json()
        assert body["error"] == "forbidden_source"
        assert "127.0.0.1" in body["detail"]
        oversized = urlencode({**VECTOR_A, "padding": "x" * settings.max_body_bytes})
        response = await client.post(PATH, data=oversized, headers={"Content-Type": FORM})
        assert response.status == 403
        assert (await client.get("/metrics")).status == 403
        assert (await client.get("/nowhere")).status == 403
        assert refused_count(client) == 4
        assert await depth(settings, amqp_connection) == 0

    async def test_health_stays_open(self, aiohttp_client, make_settings):
        """/healthz and /readyz answer any source: orchestrators probe from their own networks."""
        settings = make_settings(ingress_allowed_networks=[EDRONE])
        client = await aiohttp_client(create_app(settings))
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200

    async def test_forwarded_for_from_a_trusted_proxy(
        self, aiohttp_client, make_settings, amqp_connection
    ):
        """Behind a trusted proxy the source is the X-Forwarded-For hop the proxy added: an
        allowed one is served, others are refused, and a hop the client wrote is ignored."""
        settings = make_settings(ingress_allowed_networks=[EDRONE], ingress_trusted_proxies=[PROXY])
        client = await aiohttp_client(create_app(settings))

        async def post(forwarded_for: str) -> int:
            request = form_body(VECTOR_A)
            request["headers"]["X-Forwarded-For"] = forwarded_for
            return (await client.post(PATH, **request)).status

        assert await post("198.51.100.1") == 403
        assert await post("203.0.113.7, 198.51.100.1") == 403  # 198.51.100.1 claims edrone's
        assert await post("unknown") == 403
        assert await depth(settings, amqp_connection) == 0
        assert await post("198.51.100.1, 203.0.113.7") == 200
        assert await depth(settings, amqp_connection) == 1

    async def test_spoofed_forwarded_for_from_an_untrusted_peer(
        self, aiohttp_client, make_settings, amqp_connection
    ):
        """A peer that is no trusted proxy cannot pass as an allowed source by X-Forwarded-For."""
        settings = make_settings(
            ingress_allowed_networks=[EDRONE], ingress_trusted_proxies=[ELSEWHERE]
        )
        client = await aiohttp_client(create_app(settings))
        request = form_body(VECTOR_A)
        request["headers"]["X-Forwarded-For"] = "203.0.113.7"
        response = await client.post(PATH, **request)
        assert response.status == 403
        assert "127.0.0.1" in (await response.json())["detail"]
        assert await depth(settings, amqp_connection) == 0

    async def test_empty_allow_list_allows_everyone(self, aiohttp_client, make_settings):
        """Without an allow-list no source is refused, whatever X-Forwarded-For says."""
        settings = make_settings(ingress_trusted_proxies=[PROXY])
        client = await aiohttp_client(create_app(settings))
        request = form_body(VECTOR_A)
        request["headers"]["X-Forwarded-For"] = "unknown"
        assert (await client.post(PATH, **request)).status == 200


class TestHeaderLimits:
    async def test_oversized_header_by_default(self, client, settings, amqp_connection):
        """A header line over 8190 bytes, aiohttp's and the bridge's default, is a 400."""
        request = form_body(VECTOR_A)
        request["headers"]["X-Padding"] = "x" * (settings.max_header_bytes + 1)
        response = await client.post(PATH, **request)
        assert response.status in (400, 431)
        assert await depth(settings, amqp_connection) == 0

    async def test_configured_header_size(self, aiohttp_client, make_settings, amqp_connection):
        """max_header_bytes is the parser's limit: a header just under it passes, one over it
        gets 400 and publishes nothing."""
        settings = make_settings(max_header_bytes=1024)
        client = await aiohttp_client(create_app(settings))
        over = form_body(VECTOR_A)
        over["headers"]["X-Padding"] = "x" * 1100
        assert (await client.post(PATH, **over)).status in (400, 431)
        assert await depth(settings, amqp_connection) == 0
        under = form_body(VECTOR_A)
        under["headers"]["X-Padding"] = "x" * 900
        assert (await client.post(PATH, **under)).status == 200
        assert await depth(settings, amqp_connection) == 1

    async def test_configured_header_count(self, aiohttp_client, make_settings, amqp_connection):
        """More headers than max_headers get 400 and publish nothing."""
        settings = make_settings(max_headers=16)
        client = await aiohttp_client(create_app(settings))
        request = form_body(VECTOR_A)
        request["headers"].update({f"X-Extra-{n}": "x" for n in range(20)})
        assert (await client.post(PATH, **request)).status in (400, 431)
        assert await depth(settings, amqp_connection) == 0

    async def test_configured_request_line(self, aiohttp_client, make_settings, amqp_connection):
        """A request line (path and query string, where legacy callbacks put their fields) over
        max_request_line_bytes gets 4xx and publishes nothing; a shorter one is served."""
        settings = make_settings(max_request_line_bytes=512)
        client = await aiohttp_client(create_app(settings))
        padded = urlencode({**VECTOR_D, "padding": "x" * 600})
        response = await client.post(f"{PATH}?{padded}")
        assert response.status in (400, 414, 431)
        assert await depth(settings, amqp_connection) == 0
        response = await client.post(f"{PATH}?{urlencode(VECTOR_D)}")
        assert response.status == 200, await response.text()
        assert await depth(settings, amqp_connection) == 1


class TestFoundByFuzzing:
    @pytest.mark.parametrize("type_id", [" 1", "1 ", " 2", "2\t"])
    async def test_type_id_is_read_as_signed(self, client, settings, amqp_connection, type_id):
        """A signed SMS change cannot be turned into a change of the unsigned e-mail beside it:
        the type id is read exactly as the signature chose its address (padded ones are 400)."""
        fields = {**VECTOR_B, "subscription_status_type_id": type_id, "email": "x@example.org"}
        response = await client.post(PATH, **form_body(fields))
        assert response.status in (400, 401), await response.text()
        assert await depth(settings, amqp_connection) == 0

    async def test_body_that_does_not_decompress(self, client, settings, amqp_connection):
        """A gzip Content-Encoding over a body that is no gzip is a 400, not a 500. The answer
        closes the connection, which aiohttp drops after it: the client's next request, sent at
        once, is served on a new one (it failed with ServerDisconnectedError)."""
        request = form_body(VECTOR_A)
        request["headers"]["Content-Encoding"] = "gzip"
        response = await client.post(PATH, **request)
        assert response.status == 400
        assert (await response.json())["error"] == "malformed_body"
        assert response.headers["Connection"] == "close"
        assert await depth(settings, amqp_connection) == 0
        response = await client.post(PATH, **form_body(VECTOR_A))
        assert response.status == 200, await response.text()

    @pytest.mark.parametrize("content_type", [";0*", "application/json; charset*", f"{FORM}; x*"])
    async def test_content_type_that_does_not_parse(
        self, client, settings, amqp_connection, content_type
    ):
        """A Content-Type whose parameter name ends in '*' with no value is a 415, not a 500
        from the standard library's header parser."""
        body = urlencode(VECTOR_A)
        response = await client.post(PATH, data=body, headers={"Content-Type": content_type})
        assert response.status == 415, await response.text()
        assert (await response.json())["error"] == "unsupported_content_type"
        assert await depth(settings, amqp_connection) == 0

    @pytest.mark.parametrize("field", ["signature", "event_id", "app_id"])
    async def test_lone_surrogate_in_json(self, client, settings, amqp_connection, field):
        """A lone \\ud800 escape is valid JSON but no text: a 400, not a 500 from the hashing."""
        body = json.dumps({**VECTOR_A, field: "\ud800"})
        response = await client.post(PATH, data=body, headers={"Content-Type": "application/json"})
        assert response.status == 400
        assert (await response.json())["error"] == "malformed_body"
        assert await depth(settings, amqp_connection) == 0
