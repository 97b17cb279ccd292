"""fake-edrone over real HTTP: it answers traces like edrone, records every request, and injects
the faults it is told to, switchable while it runs."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bridge.devtools.fake_edrone import EVENT_ID_HEADER, FakeEdrone, Faults, serve

SEED = 20240115
SUBSCRIBE = {
    "app_id": "5f3e1a2b3c4d5",
    "action_type": "subscribe",
    "sender_type": "server",
    "email": "jan.kowalski+news@example.com",
    "subscriber_status": "1",
    "customer_tags": "newsletter|shop",
    "first_name": "Zażółć",
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeEdrone]:
    async with FakeEdrone(seed=SEED) as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    session: aiohttp.ClientSession, url: str, form: dict[str, str] | str | None = None, **kw: Any
) -> tuple[int, dict[str, str], str]:
    """One trace: status, headers and body text."""
    async with session.post(url, data=SUBSCRIBE if form is None else form, **kw) as response:
        return response.status, dict(response.headers), await response.text()


async def put_faults(
    session: aiohttp.ClientSession, fake: FakeEdrone, payload: Any
) -> tuple[int, Any]:
    async with session.put(f"{fake.base_url}/faults", json=payload) as response:
        return response.status, await response.json()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


async def statuses(session: aiohttp.ClientSession, fake: FakeEdrone, count: int) -> list[int]:
    """The statuses of ``count`` traces sent one after another (so the draws stay in order)."""
    return [(await post(session, fake.url))[0] for _ in range(count)]


class TestAnswers:
    async def test_valid_subscribe_is_accepted_and_recorded(self, fake, session):
        """A complete subscribe trace gets 200 with an x-edrone-event-id header, and its record
        holds the decoded form, the raw body, the content type and that same event id."""
        status, headers, _ = await post(session, fake.url)

        assert status == 200
        event_id = headers[EVENT_ID_HEADER]
        assert event_id
        [record] = fake.requests
        assert record.form == SUBSCRIBE
        assert dict(record.form_multi) == SUBSCRIBE
        assert "email=jan.kowalski%2Bnews%40example.com" in record.body
        assert record.headers["content-type"] == "application/x-www-form-urlencoded"
        assert (record.method, record.path, record.status) == ("POST", "/trace", 200)
        assert (record.event_id, record.fault) == (event_id, None)

    async def test_event_ids_are_unique(self, fake, session):
        """Every accepted trace gets its own event id, also when many arrive at once."""
        answers = await asyncio.gather(*(post(session, fake.url) for _ in range(50)))

        ids = {headers[EVENT_ID_HEADER] for _, headers, _ in answers}
        assert len(ids) == 50
        assert {record.event_id for record in fake.requests} == ids

    @pytest.mark.parametrize("name", ["app_id", "email", "action_type"])
    @pytest.mark.parametrize("how", ["absent", "empty"])
    async def test_missing_required_field_is_named(self, fake, session, name, how):
        """Without app_id, email or action_type (absent or empty) the answer is edrone's
        400 JSON ``Missing required field: <name>``, without an event id, and it is recorded."""
        form = {k: v for k, v in SUBSCRIBE.items() if k != name}
        if how == "empty":
            form[name] = ""

        async with session.post(fake.url, data=form) as response:
            assert response.status == 400
            assert EVENT_ID_HEADER not in response.headers
            assert await response.json() == {"error": f"Missing required field: {name}"}
        assert [(r.status, r.event_id) for r in fake.requests] == [(400, None)]

    @pytest.mark.parametrize(
        ("left_out", "named"),
        [
            (("app_id", "email", "action_type"), "app_id"),
            (("email", "action_type"), "email"),
            (("app_id", "action_type"), "app_id"),
        ],
    )
    async def test_first_missing_field_in_edrone_order(self, fake, session, left_out, named):
        """With several fields missing, the error names the first of app_id, email, action_type."""
        form = {k: v for k, v in SUBSCRIBE.items() if k not in left_out}

        status, _, body = await post(session, fake.url, form)

        assert (status, body) == (400, f'{{"error": "Missing required field: {named}"}}')

    async def test_email_is_required_only_for_subscribe(self, fake, session):
        """edrone requires the e-mail for ``subscribe``; another action without it is accepted."""
        form = {"app_id": "5f3e1a2b3c4d5", "action_type": "product_view"}

        status, headers, _ = await post(session, fake.url, form)

        assert status == 200
        assert EVENT_ID_HEADER in headers

    async def test_json_body_is_refused_and_recorded(self, fake, session):
        """A trace sent as JSON is refused with a 415 JSON error, and still recorded raw."""
        async with session.post(fake.url, json=SUBSCRIBE) as response:
            assert response.status == 415
            assert "application/x-www-form-urlencoded" in (await response.json())["error"]

        [record] = fake.requests
        assert (record.status, record.form, record.form_multi) == (415, {}, ())
        assert record.headers["content-type"] == "application/json"
        assert '"app_id": "5f3e1a2b3c4d5"' in record.body

    async def test_other_methods_are_refused_and_recorded(self, fake, session):
        """A GET to the trace endpoint gets 405 with Allow: POST and is recorded too."""
        async with session.get(fake.url, params={"email": "a@example.com"}) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"

        [record] = fake.requests
        assert (record.method, record.status) == ("GET", 405)
        assert record.query_string == "email=a@example.com"

    async def test_raw_body_shows_how_values_were_encoded(self, fake, session):
        """A value encoded twice is visible as such: the raw body is kept as sent, and the
        decoded form shows what edrone would store."""
        body = "app_id=a1&action_type=subscribe&email=jan%2540example.com"
        headers = {"Content-Type": "application/x-www-form-urlencoded"}

        status, _, _ = await post(session, fake.url, body, headers=headers)

        assert status == 200
        [record] = fake.requests
        assert record.body == body
        assert record.form["email"] == "jan%40example.com"

    async def test_repeated_field_keeps_every_value(self, fake, session):
        """A repeated field loses nothing: ``form`` holds the last value (as PHP reads it) and
        ``form_multi`` every pair in order."""
        form = [*SUBSCRIBE.items(), ("customer_tags", "a"), ("customer_tags", "b")]

        async with session.post(fake.url, data=form) as response:
            assert response.status == 200

        [record] = fake.requests
        assert record.form["customer_tags"] == "b"
        tags = [value for name, value in record.form_multi if name == "customer_tags"]
        assert tags == ["newsletter|shop", "a", "b"]

    async def test_healthz(self, fake, session):
        """``GET /healthz`` answers 200 and is not recorded as a trace."""
        assert await get_json(session, f"{fake.base_url}/healthz") == {"status": "ok"}
        assert fake.requests == []


class TestFaults:
    async def test_fixed_status_then_switched_back_over_http(self, fake, session):
        """A fixed status set over PUT /faults answers every trace, valid or not, until a
        PUT puts the defaults back; each answer's record names the fault."""
        assert (await put_faults(session, fake, {"status": 503}))[0] == 200
        assert (await get_json(session, f"{fake.base_url}/faults"))["status"] == 503

        assert (await post(session, fake.url))[0] == 503
        assert (await post(session, fake.url, {"email": "x@example.com"}))[0] == 503

        status, body = await put_faults(session, fake, {})
        assert (status, body) == (200, Faults().to_json())
        assert (await post(session, fake.url))[0] == 200
        assert [(r.status, r.fault) for r in fake.requests] == [
            (503, "status"),
            (503, "status"),
            (200, None),
        ]

    async def test_faults_changed_in_python_apply_at_once(self, fake, session):
        """``fake.faults`` is the live setting: a change made in Python applies to the next
        trace, and GET /faults shows it."""
        fake.faults.status = 429

        assert (await post(session, fake.url))[0] == 429
        assert (await get_json(session, f"{fake.base_url}/faults"))["status"] == 429

    @pytest.mark.parametrize(("rate", "expected"), [(1.0, [502] * 20), (0.0, [200] * 20)])
    async def test_failure_rate_extremes(self, fake, session, rate, expected):
        """failure_rate 1.0 fails every trace with failure_status; 0.0 fails none."""
        await put_faults(session, fake, {"failure_rate": rate, "failure_status": 502})

        assert await statuses(session, fake, 20) == expected

    async def test_half_failure_rate_is_about_half_and_reproducible(self, session):
        """failure_rate 0.5 fails about half the traces, and the same seed fails the same ones."""
        runs = []
        for _ in range(2):
            async with FakeEdrone(seed=SEED, faults=Faults(failure_rate=0.5)) as fake:
                runs.append(await statuses(session, fake, 300))

        assert runs[0] == runs[1]
        assert set(runs[0]) == {200, 500}
        assert 120 <= runs[0].count(500) <= 180

    async def test_latency_delays_each_answer(self, fake, session):
        """latency_ms holds every answer back by at least that long."""
        await put_faults(session, fake, {"latency_ms": 200})

        started = time.monotonic()
        status, _, _ = await post(session, fake.url)

        assert status == 200
        assert time.monotonic() - started >= 0.2

    async def test_request_is_recorded_even_when_the_caller_gives_up(self, session):
        """A caller that times out during the added latency still finds its attempt recorded."""
        async with FakeEdrone(faults=Faults(latency_ms=2_000), shutdown_timeout_s=0.1) as fake:
            with pytest.raises(TimeoutError):
                await post(session, fake.url, timeout=aiohttp.ClientTimeout(total=0.2))

            assert [r.status for r in fake.requests] == [200]

    async def test_injected_failure_has_json_error_and_retry_after(self, fake, session):
        """An injected failure answers a JSON error and, when configured, Retry-After."""
        faults = {"failure_rate": 1, "failure_status": 429, "retry_after": 7}
        await put_faults(session, fake, faults)

        status, headers, body = await post(session, fake.url)

        assert (status, headers["Retry-After"]) == (429, "7")
        assert headers["Content-Type"].startswith("application/json")
        assert "Too Many Requests" in body
        assert EVENT_ID_HEADER not in headers

    async def test_no_retry_after_unless_configured(self, fake, session):
        """Without retry_after, an injected failure carries no Retry-After header."""
        await put_faults(session, fake, {"status": 503})

        status, headers, _ = await post(session, fake.url)

        assert status == 503
        assert "Retry-After" not in headers

    async def test_injected_body_replaces_the_error(self, fake, session):
        """A configured body is sent as is, say a proxy's HTML error page."""
        await put_faults(session, fake, {"status": 502, "body": "<html>Bad Gateway</html>"})

        status, _, body = await post(session, fake.url)

        assert (status, body) == (502, "<html>Bad Gateway</html>")

    @pytest.mark.parametrize(
        "payload",
        [
            {"failure_rate": 1.5},
            {"failure_rate": -0.1},
            {"failure_rate": "0.5"},
            {"failure_rate": True},
            {"failure_rate": float("nan")},
            {"failure_status": 200},
            {"failure_status": "500"},
            {"status": 99},
            {"status": 600},
            {"status": 503.0},
            {"latency_ms": -1},
            {"latency_ms": 10**400},
            {"retry_after": -1},
            {"retry_after": 1.5},
            {"body": 5},
            {"latency": 100},
            [],
            None,
        ],
    )
    async def test_invalid_faults_are_refused_and_change_nothing(self, fake, session, payload):
        """A PUT /faults with a bad value, an unknown key or no object answers 400 JSON and
        leaves the faults as they were."""
        await put_faults(session, fake, {"latency_ms": 5, "retry_after": 3})
        before = await get_json(session, f"{fake.base_url}/faults")

        status, body = await put_faults(session, fake, payload)

        assert status == 400
        assert body["error"].startswith("invalid faults")
        assert await get_json(session, f"{fake.base_url}/faults") == before

    async def test_put_that_is_not_json_is_refused(self, fake, session):
        """A PUT /faults body that is not JSON answers 400 JSON."""
        async with session.put(f"{fake.base_url}/faults", data="status=503") as response:
            assert response.status == 400
            assert (await response.json())["error"].startswith("invalid faults: not JSON")
        assert fake.faults == Faults()

    def test_faults_validate_in_python(self):
        """Faults built in Python (say, from the CLI's flags) are checked the same way."""
        with pytest.raises(ValueError, match="failure_rate"):
            Faults(failure_rate=2)


class TestRecordings:
    async def record_mix(self, session: aiohttp.ClientSession, fake: FakeEdrone) -> None:
        """Accepted, refused and fault-injected traces."""
        await post(session, fake.url)
        await post(session, fake.url, {"email": "x@example.com"})
        fake.faults.status = 500
        await post(session, fake.url)
        fake.faults.status = None

    async def test_json_equals_the_python_records(self, fake, session):
        """GET /requests gives exactly the records ``fake.requests`` holds, in order."""
        await self.record_mix(session, fake)

        body = await get_json(session, f"{fake.base_url}/requests")

        assert body["requests"] == [record.to_json() for record in fake.requests]
        assert [r["status"] for r in body["requests"]] == [200, 400, 500]
        assert (body["next"], body["dropped"]) == (3, 0)

    async def test_since_returns_the_newer_records(self, fake, session):
        """``?since=N`` returns the records from index N on; ``next`` is where to go on from."""
        await self.record_mix(session, fake)

        body = await get_json(session, f"{fake.base_url}/requests?since=1")
        assert [r["index"] for r in body["requests"]] == [1, 2]
        later = await get_json(session, f"{fake.base_url}/requests?since={body['next']}")
        assert later["requests"] == []

    async def test_since_must_be_an_integer(self, fake, session):
        """A ``since`` that is not an integer answers 400 JSON."""
        async with session.get(f"{fake.base_url}/requests?since=x") as response:
            assert response.status == 400
            assert "error" in await response.json()

    async def test_delete_clears_and_indexes_go_on(self, fake, session):
        """DELETE /requests empties the recording; later records keep counting, so a reader's
        ``since`` stays valid."""
        await self.record_mix(session, fake)

        async with session.delete(f"{fake.base_url}/requests") as response:
            assert await response.json() == {"cleared": 3, "next": 3}
        assert fake.requests == []

        await post(session, fake.url)
        body = await get_json(session, f"{fake.base_url}/requests")
        assert [r["index"] for r in body["requests"]] == [3]

    async def test_memory_bound_drops_the_oldest_and_counts_them(self, session):
        """With max_records N only the newest N are kept; the dropped ones are counted."""
        async with FakeEdrone(max_records=5) as fake:
            await statuses(session, fake, 8)

            assert [r.index for r in fake.requests] == [3, 4, 5, 6, 7]
            assert fake.dropped == 3
            body = await get_json(session, f"{fake.base_url}/requests")
            assert [r["index"] for r in body["requests"]] == [3, 4, 5, 6, 7]
            assert body["dropped"] == 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_answers_until_the_event_is_set(session):
    """``serve`` listens on the given port with the given faults, and returns, closing the
    port, once ``stopping`` is set."""
    port = free_port()
    stopping = asyncio.Event()
    task = asyncio.create_task(serve("127.0.0.1", port, stopping, Faults(status=503), seed=1))
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            await get_json(session, f"{base}/healthz")
            break
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(0.02)

    assert (await post(session, f"{base}/trace"))[0] == 503

    stopping.set()
    await asyncio.wait_for(task, 5)
    with pytest.raises(aiohttp.ClientConnectorError):
        await get_json(session, f"{base}/healthz")
