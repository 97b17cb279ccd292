"""The ingress under arbitrary input: hypothesis POSTs bodies, headers, content types and query
strings to the real app against the real broker. No answer is a 5xx other than the broker's 503,
and nothing is published without a valid signature (DESIGN.md promise 1 holds only for those)."""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, assume, example, given
from hypothesis import settings as fuzzing
from hypothesis import strategies as st

from bridge.amqp import topology
from bridge.ingress.allowlist import source_address, within
from bridge.ingress.app import create_app
from bridge.webhook import REQUIRED_FIELDS
from tests.bridge.test_ingress import FORM, PATH
from tests.bridge.test_ingress_security import EDRONE, PROXY
from tests.vectors import APP_ID, VECTOR_A, VECTOR_B, VECTOR_D, VECTOR_E

JSON = "application/json"

# The fixtures are function-scoped: every example reuses the test's one app and broker channel
# on purpose, and counts the queues after its request (a passive declare: cheap).
FUZZ = fuzzing(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- arbitrary requests ----------------------------------------------------------------------

FIELD_NAMES = sorted({n for names in REQUIRED_FIELDS.values() for n in names} | {"phone"})
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=20)
# Every code point, and often a lone surrogate: JSON can carry one as a \ud800 escape.
# (A list, not st.text: text() merges the two alphabets and drops the surrogates.)
lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
any_text = st.lists(st.characters() | lone_surrogates, max_size=40).map("".join)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)
json_bodies = (st.dictionaries(keys, json_values, max_size=12) | json_values).map(
    lambda document: json.dumps(document).encode()
)
form_bodies = st.lists(st.tuples(keys, st.text(max_size=40)), max_size=12).map(
    lambda pairs: urlencode(pairs).encode()
)
bodies = st.binary(max_size=1024) | json_bodies | form_bodies

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
content_types = st.sampled_from(
    [
        JSON,
        f"{JSON}; charset=utf-8",
        "APPLICATION/JSON",
        FORM,
        f"{FORM}; charset=latin-1",
        "multipart/form-data; boundary=xyz",
        "text/plain",
        "application/octet-stream",
        "",
    ]
) | st.text(printable, max_size=60)
# Framing headers stay the client's: fuzzing them tests the client, not the ingress.
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "upgrade", "expect"}
header_names = st.sampled_from(
    ["Content-Encoding", "Accept-Encoding", "X-Forwarded-For", "Authorization", "Cookie"]
) | st.from_regex(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}\Z").filter(
    lambda name: name.lower() not in FRAMING | {"content-type"}
)
header_values = st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "*/*"]) | st.text(
    printable, max_size=80
)
headers = st.dictionaries(header_names, header_values, max_size=8)
queries = st.dictionaries(keys, st.text(max_size=30), max_size=6).map(urlencode)


class Queues:
    """Counts the messages in every queue the ingress declares (the subscription work queue, where
    the webhook exchange routes, and its dead-letter queue) over one channel, so that every
    example can afford to look."""

    def __init__(self, settings, channel) -> None:
        names = topology(settings)
        self.names = [names.subscriptions_queue, names.dead_letter_queue(names.subscriptions_queue)]
        self.channel = channel

    async def total(self) -> int:
        total = 0
        for name in self.names:
            queue = await self.channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
        return total


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def queues(client, settings, amqp_connection):
    """The queues of ``client``'s deployment (the app has declared them by now)."""
    channel = await amqp_connection.channel()
    yield Queues(settings, channel)
    await channel.close()


def signed_form() -> dict[str, Any]:
    return {"data": urlencode(VECTOR_A), "headers": {"Content-Type": FORM}}


async def test_the_count_sees_a_published_webhook(client, queues):
    """The control for the zero counts below: a signed webhook to the same app is counted."""
    assert await queues.total() == 0
    response = await client.post(PATH, **signed_form())
    assert response.status == 200, await response.text()
    assert await queues.total() == 1


@FUZZ
@given(body=bodies, content_type=content_types, extra=headers, query=queries)
async def test_arbitrary_requests(client, queues, body, content_type, extra, query):
    """Arbitrary bodies, headers, content types and query strings never get a 5xx other than
    503, and publish nothing: none of them carries a valid signature."""
    url = f"{PATH}?{query}" if query else PATH
    response = await client.post(url, data=body, headers={**extra, "Content-Type": content_type})
    text = await response.text(errors="replace")
    assert response.status < 500 or response.status == 503, (response.status, text)
    assert response.status != 200, text
    assert await queues.total() == 0


# --- signed webhooks with one signed field changed -------------------------------------------

# The fields each vector's signature covers (edrone-protocol.md §1). The others (the phone of an
# e-mail change, the e-mail of an SMS change) are outside edrone's formula, so changing them is
# not a forgery this test can expect to be refused.
SIGNED_FIELDS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "NATIVE_5 e-mail": (VECTOR_A, tuple(f for f in VECTOR_A if f != "phone")),
    "NATIVE_5 SMS": (VECTOR_B, tuple(f for f in VECTOR_B if f != "email")),
    "LEGACY_UPDATE": (VECTOR_D, tuple(VECTOR_D)),
    "LEGACY_UNSUBSCRIBE": (VECTOR_E, tuple(VECTOR_E)),
}


@st.composite
def mutated_webhooks(draw: st.DrawFn) -> tuple[dict[str, str], str]:
    """A correctly signed webhook with one signed field's value changed, and how to send it."""
    original, signed = SIGNED_FIELDS[draw(st.sampled_from(sorted(SIGNED_FIELDS)))]
    field = draw(st.sampled_from(signed))
    legacy = "subscription_status_type_id" not in original
    encoding = draw(st.sampled_from(["json", "form", "query"] if legacy else ["json", "form"]))
    was = original[field]
    # Near misses first (case, whitespace, a cut, the other type id), then anything at all;
    # only JSON can carry a lone surrogate (as a \ud800 escape).
    near = [was.upper(), f" {was}", f"{was} ", f"{was}\t", was[:-1], "1", " 1", "2", " 2", ""]
    anything = any_text if encoding == "json" else st.text(max_size=60)
    value = draw(st.sampled_from(near) | anything)
    if field == "app_id":
        # The app is looked up by the trimmed app_id, and an empty one by the signature alone:
        # only another app_id changes what was signed.
        assume(value.strip() and value.strip() != APP_ID)
    assume(value != was)
    return {**original, field: value}, encoding


@FUZZ
@given(mutated=mutated_webhooks())
# Found by this test: the type id was trimmed when read but not when signed, so " 1" turned a
# signed SMS change into a change of the (unsigned) e-mail beside it; and a lone surrogate in
# a JSON field failed the hashing with a 500.
@example(mutated=({**VECTOR_B, "subscription_status_type_id": " 1"}, "form"))
@example(mutated=({**VECTOR_A, "signature": "\ud800"}, "json"))
async def test_mutated_signed_webhooks(client, queues, mutated):
    """A signed webhook with any one signed field changed is refused with a 4xx."""
    fields, encoding = mutated
    if encoding == "json":
        request = {"data": json.dumps(fields), "headers": {"Content-Type": JSON}}
        response = await client.post(PATH, **request)
    elif encoding == "form":
        response = await client.post(PATH, data=urlencode(fields), headers={"Content-Type": FORM})
    else:
        response = await client.post(f"{PATH}?{urlencode(fields)}")
    assert 400 <= response.status < 500, (response.status, await response.text())
    assert await queues.total() == 0


# --- the allow-list's reading of X-Forwarded-For -------------------------------------------------

hops = (
    st.ip_addresses(network=str(EDRONE)).map(str)
    | st.ip_addresses(network=str(PROXY)).map(str)
    | st.ip_addresses().map(str)
    | st.ip_addresses(v=6).map(lambda address: f"[{address}]:443")
    | st.text(printable, max_size=20)
)
forwarded_for = st.lists(hops, max_size=5).map(", ".join)


@given(peer=st.ip_addresses().map(str) | st.text(max_size=20), header=st.lists(forwarded_for))
def test_source_address_only_reads_or_refuses(peer, header):
    """Any peer and X-Forwarded-For gives a source address or ValueError, nothing else."""
    with contextlib.suppress(ValueError):
        source_address(peer, header, [PROXY])


@pytest.fixture
async def behind_proxy(aiohttp_client, make_settings, amqp_connection):
    """An app allowing only EDRONE, behind a trusted proxy at 127.0.0.1 (the test client)."""
    settings = make_settings(ingress_allowed_networks=[EDRONE], ingress_trusted_proxies=[PROXY])
    client = await aiohttp_client(create_app(settings))
    channel = await amqp_connection.channel()
    # Examples share the app and its queue: each one adds what it expects to the count.
    yield client, Queues(settings, channel), {"published": 0}
    await channel.close()


@FUZZ
@given(header=forwarded_for)
async def test_forwarded_for_behind_a_trusted_proxy(behind_proxy, header):
    """Behind a trusted proxy, a signed webhook is published exactly when the source read from
    X-Forwarded-For is allowed, and refused with 403 otherwise; never a 5xx."""
    client, queues, expected = behind_proxy
    try:
        allowed = within(source_address("127.0.0.1", [header], [PROXY]), [EDRONE])
    except ValueError:
        allowed = False
    request = signed_form()
    request["headers"]["X-Forwarded-For"] = header
    response = await client.post(PATH, **request)
    assert response.status == (200 if allowed else 403), await response.text()
    expected["published"] += allowed
    assert await queues.total() == expected["published"]
