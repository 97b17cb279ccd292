"""The trace forwarder against real RabbitMQ, PostgreSQL and a running fake-edrone: the exact
form, dead-lettering, retry tiers and Retry-After, the breaker, coalescing, no-op and echo
suppression, and the rate limit under a burst."""

from __future__ import annotations

import asyncio
import bisect
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from urllib.parse import parse_qsl

import pytest

from bridge import bridge_version
from bridge.amqp import topology
from bridge.app_config import AppConfig
from bridge.devtools.fake_edrone import FORM
from bridge.headers import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_FIRST_FAILURE,
    HEADER_ORIGINAL_QUEUE,
)
from schemas.platform_event import EXAMPLE_FILE
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import (
    depths,
    forward_burst,
    publish_platform,
    ready_count,
    running,
    shop_event,
    take_all,
    trace_consumer,
    wait_until,
)

OTHER_APP_ID = "app-without-tags"
APP_TAGS = ("shop-default", "newsletter")
TWO_APPS = {
    TEST_APP_ID: AppConfig(secret=TEST_SECRET, customer_tags=APP_TAGS),
    OTHER_APP_ID: AppConfig(secret="other-secret"),
}


def decoded(record) -> dict[str, str]:
    """The recorded raw body, decoded here (not by the fake): every field once, blanks kept."""
    pairs = parse_qsl(record.body, keep_blank_values=True, strict_parsing=True)
    form = dict(pairs)
    assert len(form) == len(pairs), f"a field sent twice: {pairs}"
    return form


def sent_for(fake, email) -> list:
    return [r for r in fake.requests if r.form.get("email") == email]


def accepted(fake) -> Counter[str]:
    """Per e-mail, how many of its traces edrone answered 200."""
    return Counter(r.form["email"] for r in fake.requests if r.status == 200)


def gaps(requests) -> list[float]:
    times = [r.received_monotonic for r in requests]
    return [round(later - earlier, 3) for earlier, later in pairwise(times)]


def form(app_id=TEST_APP_ID, email="jan@example.com", **fields) -> dict[str, str]:
    """The trace form the forwarder must send, for the form tests' settings."""
    return {
        "app_id": app_id,
        "action_type": "subscribe",
        "sender_type": "server",
        "email": email,
        "subscriber_status": "1",
        "event_utc_date": "2024-01-15 10:30:00",
        "version": bridge_version(),
        "platform": "magento",
        "platform_version": "2.4.7",
        **fields,
    }


def event(app_id=TEST_APP_ID, email="jan@example.com", **fields):
    return shop_event(email, at=datetime(2024, 1, 15, 10, 30, tzinfo=UTC), app_id=app_id, **fields)


FORM_CASES = {
    "email only, no tags anywhere": (
        event(OTHER_APP_ID),
        form(OTHER_APP_ID),
    ),
    "e-mail and SMS status with phone": (
        event(OTHER_APP_ID, status=0, phone="+48500100200", sms_subscriber_status=1),
        form(OTHER_APP_ID, subscriber_status="0", phone="+48500100200", sms_subscriber_status="1"),
    ),
    "a typed phone is sent in E.164": (
        event(OTHER_APP_ID, status=0, phone="48 500-100-200", sms_subscriber_status=1),
        form(OTHER_APP_ID, subscriber_status="0", phone="+48500100200", sms_subscriber_status="1"),
    ),
    "phone without an SMS status": (
        event(OTHER_APP_ID, phone="+48500100200", sms_subscriber_status=None),
        form(OTHER_APP_ID, phone="+48500100200"),
    ),
    "names, a '+' address and non-ASCII letters": (
        event(
            OTHER_APP_ID,
            email="Zofia+News@Example.COM",
            first_name="Łucja",
            last_name="Żółć & Gęś=Ślą",
        ),
        form(
            OTHER_APP_ID,
            email="zofia+news@example.com",
            first_name="Łucja",
            last_name="Żółć & Gęś=Ślą",
        ),
    ),
    "tags from the event as a list win over the app default": (
        event(customer_tags=["newsletter-form", "checkout"]),
        form(customer_tags="newsletter-form|checkout"),
    ),
    "tags from the event as an 'a|b' string": (
        event(customer_tags=" vip | black friday |"),
        form(customer_tags="vip|black friday"),
    ),
    "the app's default tags when the event has none": (
        event(),
        form(customer_tags="shop-default|newsletter"),
    ),
    "null subscriber_status is sent empty": (
        event(status=None),
        form(customer_tags="shop-default|newsletter", subscriber_status=""),
    ),
    "an offset time is sent in UTC": (
        event() | {"occurred_at": "2024-01-15T12:30:00.750+02:00"},
        form(customer_tags="shop-default|newsletter"),
    ),
    "the shipped example, every field": (
        # The example names the quick start's app; here it is the test's.
        json.loads(EXAMPLE_FILE.read_text()) | {"app_id": TEST_APP_ID},
        form(
            email="jan.kowalski@example.com",
            phone="+48500100200",
            sms_subscriber_status="0",
            first_name="Jan",
            last_name="Kowalski",
            customer_tags="newsletter-form|checkout",
            event_utc_date="2026-11-26 14:05:09",
        ),
    ),
}


class TestForm:
    @pytest.mark.parametrize(("published", "expected"), FORM_CASES.values(), ids=FORM_CASES)
    async def test_form_body_field_by_field(
        self, fake, make_traces, amqp_connection, pool, published, expected
    ):
        """Each field combination of a shop event becomes exactly this form, one POST to
        /trace, form-encoded, each field once."""
        settings = await make_traces(apps=TWO_APPS, platform="magento", platform_version="2.4.7")
        await publish_platform(amqp_connection, settings, [published])

        consumer = await forward_burst(amqp_connection, pool, settings)

        [request] = fake.requests
        assert (request.method, request.path, request.status) == ("POST", "/trace", 200)
        assert request.headers["content-type"] == FORM
        assert decoded(request) == expected
        assert consumer.counters.sent == 1

    async def test_values_are_encoded_exactly_once(self, fake, make_traces, amqp_connection, pool):
        """'+', '@', '&', '=', spaces and non-ASCII letters are percent-encoded once (UTF-8),
        never twice: the raw body holds %2B, not %252B."""
        settings = await make_traces(apps=TWO_APPS)
        published = event(
            OTHER_APP_ID,
            email="zofia+news@example.com",
            first_name="Łucja Maria",
            last_name="Gęś&Syn=1",
        )
        await publish_platform(amqp_connection, settings, [published])

        await forward_burst(amqp_connection, pool, settings)

        [request] = fake.requests
        assert "email=zofia%2Bnews%40example.com" in request.body
        assert "first_name=%C5%81ucja+Maria" in request.body
        assert "last_name=G%C4%99%C5%9B%26Syn%3D1" in request.body
        assert "%25" not in request.body
        assert decoded(request)["last_name"] == "Gęś&Syn=1"


class TestDeadLettering:
    async def test_schema_breaking_messages_are_dead_lettered_at_once(
        self, fake, make_traces, amqp_connection, pool
    ):
        """A message that breaks the event contract goes to the DLQ on its first delivery,
        x-error naming the field, without a call to edrone; its batch still goes out."""
        settings = await make_traces(flush_interval_ms=300)
        names = topology(settings)
        broken = {
            b"{not json": "invalid platform event",
            json.dumps(shop_event(status=7)).encode(): "subscriber_status",
            json.dumps(shop_event(email="no-at-sign")).encode(): "email",
            json.dumps(shop_event(at=None) | {"occurred_at": "soon"}).encode(): "occurred_at",
            json.dumps({k: v for k, v in shop_event().items() if k != "email"}).encode(): "email",
        }
        good = shop_event("good@example.com")
        await publish_platform(amqp_connection, settings, [*broken, good])

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert [r.form["email"] for r in fake.requests] == ["good@example.com"]
        assert (consumer.counters.sent, consumer.counters.dead_lettered) == (1, len(broken))
        dead = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        assert sorted(m.body for m in dead) == sorted(broken)
        for message in dead:
            error = message.headers[HEADER_ERROR]
            assert error.startswith("invalid platform event")
            assert broken[message.body] in error
            assert message.headers[HEADER_ATTEMPTS] == 1
            assert message.headers[HEADER_ORIGINAL_QUEUE] == names.traces_queue
        assert sum((await depths(amqp_connection, settings)).values()) == 0

    async def test_unknown_or_missing_app_is_dead_lettered(
        self, fake, make_traces, amqp_connection, pool
    ):
        """An event for an app that is not configured, or without app_id while several apps
        are, goes to the DLQ saying so; nothing is sent."""
        settings = await make_traces(apps=TWO_APPS)
        names = topology(settings)
        unknown = shop_event("a@example.com", app_id="some-other-shop")
        missing = shop_event("b@example.com")
        await publish_platform(amqp_connection, settings, [unknown, missing])

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert fake.requests == []
        assert consumer.counters.dead_lettered == 2
        dead = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        errors = {json.loads(m.body)["email"]: m.headers[HEADER_ERROR] for m in dead}
        assert "unknown app_id 'some-other-shop'" in errors["a@example.com"]
        assert "without app_id" in errors["b@example.com"]

    async def test_400_is_dead_lettered_with_its_response(
        self, fake, make_traces, amqp_connection, pool
    ):
        """edrone refusing a trace with 400 dead-letters it after one attempt, the headers
        holding the status, the response body, the attempts and the failure times."""
        settings = await make_traces()
        names = topology(settings)
        fake.faults.status = 400
        fake.faults.body = '{"error": "Missing required field: customer_tags"}'
        published = shop_event()
        await publish_platform(amqp_connection, settings, [published])

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert len(fake.requests) == 1
        assert (consumer.counters.dead_lettered, consumer.counters.deferred) == (1, Counter())
        [dead] = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        assert json.loads(dead.body) == published
        headers = dead.headers
        assert headers[HEADER_ERROR] == (
            'edrone answered 400: {"error": "Missing required field: customer_tags"}'
        )
        assert headers[HEADER_ATTEMPTS] == 1
        assert headers[HEADER_ORIGINAL_QUEUE] == names.traces_queue
        first_failure = datetime.fromisoformat(headers[HEADER_FIRST_FAILURE])
        assert first_failure == datetime.fromisoformat(headers[HEADER_DEAD_LETTERED_AT])
        assert timedelta(0) <= datetime.now(UTC) - first_failure < timedelta(seconds=30)
        assert sum((await depths(amqp_connection, settings)).values()) == 0

    @pytest.mark.parametrize("status", [401, 404, 422])
    async def test_other_4xx_are_dead_lettered_at_once(
        self, fake, make_traces, amqp_connection, pool, status
    ):
        """Any 4xx other than 408, 425 and 429 is final: one attempt, then the DLQ."""
        settings = await make_traces()
        names = topology(settings)
        fake.faults.status = status
        await publish_platform(amqp_connection, settings, [shop_event()])

        await forward_burst(amqp_connection, pool, settings)

        assert len(fake.requests) == 1
        [dead] = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        assert dead.headers[HEADER_ERROR].startswith(f"edrone answered {status}: ")
        assert dead.headers[HEADER_ATTEMPTS] == 1

    async def test_after_the_last_tier_the_message_is_dead_lettered(
        self, fake, make_traces, amqp_connection, pool
    ):
        """A trace that keeps failing goes through every tier once, then to the DLQ with
        x-attempts = tiers + 1 and its first failure kept from the first attempt."""
        settings = await make_traces(retry_tiers_s=(0.2, 0.5))
        names = topology(settings)
        dlq = names.dead_letter_queue(names.traces_queue)
        fake.faults.status = 500
        await publish_platform(amqp_connection, settings, [shop_event()])

        async with trace_consumer(amqp_connection, pool, settings) as consumer, running(consumer):
            await wait_until(lambda: ready_count(amqp_connection, dlq))

        [dead] = await take_all(amqp_connection, dlq)
        assert dead.headers[HEADER_ATTEMPTS] == 3
        assert dead.headers[HEADER_ERROR].startswith(
            "gave up after 3 attempts: edrone answered 500"
        )
        first_failure = datetime.fromisoformat(dead.headers[HEADER_FIRST_FAILURE])
        dead_lettered = datetime.fromisoformat(dead.headers[HEADER_DEAD_LETTERED_AT])
        assert dead_lettered - first_failure >= timedelta(seconds=0.7)
        assert [r.status for r in fake.requests] == [500, 500, 500]
        assert consumer.counters.deferred == Counter({0.2: 1, 0.5: 1})
        assert consumer.counters.dead_lettered == 1
        print(f"\nlast tier: attempts={dead.headers[HEADER_ATTEMPTS]} gaps={gaps(fake.requests)}")


class TestRetries:
    async def test_500s_then_recovery_deliver_each_event_once(
        self, fake, make_traces, amqp_connection, pool
    ):
        """While edrone answers 500 every trace is retried through the tiers; once it recovers
        each is delivered exactly once (one 200 per event) and nothing is dead-lettered."""
        settings = await make_traces()
        fake.faults.status = 500
        emails = [f"user{n}@example.com" for n in range(10)]
        await publish_platform(amqp_connection, settings, [shop_event(e) for e in emails])

        async with trace_consumer(amqp_connection, pool, settings) as consumer, running(consumer):
            await wait_until(lambda: len(fake.requests) >= len(emails))
            fake.faults.status = None
            await wait_until(lambda: len(accepted(fake)) == len(emails))

        assert accepted(fake) == Counter(dict.fromkeys(emails, 1))
        failed = sum(r.status == 500 for r in fake.requests)
        assert failed >= len(emails)
        # Every failed call and nothing else went to a retry tier; none to the DLQ.
        assert sum(consumer.counters.deferred.values()) == failed
        assert (consumer.counters.sent, consumer.counters.dead_lettered) == (len(emails), 0)
        assert sum((await depths(amqp_connection, settings)).values()) == 0
        print(f"\n500s then recovery: failed={failed} delivered={len(accepted(fake))} dlq=0")

    @pytest.mark.parametrize("status", [408, 425, 429, 502])
    async def test_retryable_statuses_are_retried(
        self, fake, make_traces, amqp_connection, pool, status
    ):
        """408, 425, 429 and 5xx are passing failures: the trace goes to the first tier and is
        delivered when edrone answers again."""
        settings = await make_traces()
        fake.faults.status = status
        await publish_platform(amqp_connection, settings, [shop_event()])

        async with trace_consumer(amqp_connection, pool, settings) as consumer, running(consumer):
            await wait_until(lambda: fake.requests)
            fake.faults.status = None
            await wait_until(lambda: accepted(fake))

        assert [r.status for r in fake.requests] == [status, 200]
        assert consumer.counters.deferred == Counter({0.2: 1})
        assert consumer.counters.dead_lettered == 0

    async def test_timeout_is_retried_then_delivered(
        self, fake, make_traces, amqp_connection, pool
    ):
        """An answer slower than traces.timeout_s is a failed attempt: the trace is retried
        through the first tier and delivered once edrone answers in time."""
        settings = await make_traces(timeout_s=0.3)
        fake.faults.latency_ms = 800
        await publish_platform(amqp_connection, settings, [shop_event()])

        async with trace_consumer(amqp_connection, pool, settings) as consumer, running(consumer):
            await wait_until(lambda: fake.requests)
            fake.faults.latency_ms = 0
            await wait_until(lambda: consumer.counters.sent == 1)

        assert len(fake.requests) == 2
        assert consumer.counters.deferred == Counter({0.2: 1})
        [gap] = gaps(fake.requests)
        print(f"\ntimeout 0.3 s: second attempt {gap} s after the first")
        assert gap >= 0.3 + 0.2  # the timeout, then the first tier
        assert sum((await depths(amqp_connection, settings)).values()) == 0

    async def test_tiers_are_honoured(self, fake, make_traces, amqp_connection, pool):
        """The n-th retry waits at least the n-th tier's delay (and the first one less than
        the second tier): the attempts are 0.3 s, then 1.0 s apart at edrone."""
        settings = await make_traces(retry_tiers_s=(0.3, 1.0))
        fake.faults.status = 500
        await publish_platform(amqp_connection, settings, [shop_event()])

        async with trace_consumer(amqp_connection, pool, settings) as consumer, running(consumer):
            await wait_until(lambda: len(fake.requests) >= 2)
            fake.faults.status = None
            await wait_until(lambda: accepted(fake))

        assert [r.status for r in fake.requests] == [500, 500, 200]
        first, second = gaps(fake.requests)
        print(f"\ntiers (0.3, 1.0): gaps between attempts {first} s, {second} s")
        assert 0.3 <= first < 1.0
        assert second >= 1.0
        assert consumer.counters.deferred == Counter({0.3: 1, 1.0: 1})

    async def test_retry_after_picks_the_tier(self, fake, make_traces, amqp_connection, pool):
        """A Retry-After of 1 s sends the first retry to the 1.0 s tier, not the 0.2 s one."""
        settings = await make_traces(retry_tiers_s=(0.2, 1.0))
        fake.faults.status, fake.faults.retry_after = 503, 1
        await publish_platform(amqp_connection, settings, [shop_event()])

        async with trace_consumer(amqp_connection, pool, settings) as consumer, running(consumer):
            await wait_until(lambda: fake.requests)
            fake.faults.status, fake.faults.retry_after = None, None
            await wait_until(lambda: accepted(fake))

        [gap] = gaps(fake.requests)
        print(f"\nRetry-After 1: second attempt {gap} s after the first")
        assert gap >= 1.0
        assert consumer.counters.deferred == Counter({1.0: 1})

    async def test_breaker_retries_without_using_up_attempts(
        self, fake, make_traces, amqp_connection, pool
    ):
        """While edrone keeps failing the breaker pauses the calls: the traces wait in the
        tiers without using up attempts (one fails more often than the tiers allow and is not
        dead-lettered), far fewer calls than retries are made, and each trace is delivered
        once edrone recovers."""
        settings = await make_traces(
            retry_tiers_s=(0.2, 0.5),
            breaker_failures=2,
            breaker_initial_pause_s=0.2,
            breaker_max_pause_s=0.4,
        )
        dlq = topology(settings).dead_letter_queue(topology(settings).traces_queue)
        allowed = len(settings.traces.retry_tiers_s) + 1  # attempts before the DLQ
        fake.faults.status = 500
        emails = [f"user{n}@example.com" for n in range(5)]
        await publish_platform(amqp_connection, settings, [shop_event(e) for e in emails])

        def most_failures() -> int:
            failed = Counter(r.form["email"] for r in fake.requests if r.status == 500)
            return max(failed.values(), default=0)

        async with trace_consumer(amqp_connection, pool, settings) as consumer, running(consumer):
            await wait_until(lambda: most_failures() > allowed, 15)
            assert await ready_count(amqp_connection, dlq) == 0
            failed_calls = len(fake.requests)
            deferred = sum(consumer.counters.deferred.values())
            fake.faults.status = None
            await wait_until(lambda: len(accepted(fake)) == len(emails))

        print(
            f"\nbreaker: {failed_calls} failed calls for {deferred} retries,"
            f" most failures of one trace {most_failures()} (tiers allow {allowed}), dlq=0"
        )
        assert deferred > failed_calls
        assert accepted(fake) == Counter(dict.fromkeys(emails, 1))
        assert consumer.counters.dead_lettered == 0
        assert sum((await depths(amqp_connection, settings)).values()) == 0


class TestFewerCalls:
    async def test_changes_of_one_customer_in_a_batch_are_coalesced(
        self, fake, make_traces, amqp_connection, pool
    ):
        """Several changes of one customer in a batch send one trace with the newest status
        (by occurred_at, not by arrival); the others are acked as coalesced."""
        settings = await make_traces(flush_interval_ms=300)
        changes = [
            shop_event("jan@example.com", status=1, at=timedelta(seconds=-30)),
            shop_event("jan@example.com", status=0, at=timedelta(seconds=-10)),
            shop_event("jan@example.com", status=1, at=timedelta(seconds=-20)),
            shop_event("ola@example.com", status=1),
        ]
        await publish_platform(amqp_connection, settings, changes)

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert consumer.counters.batches == 1
        sent = {r.form["email"]: r.form["subscriber_status"] for r in fake.requests}
        assert sent == {"jan@example.com": "0", "ola@example.com": "1"}
        assert len(fake.requests) == 2
        assert (consumer.counters.sent, consumer.counters.skipped) == (
            2,
            Counter({"coalesced": 2}),
        )
        assert sum((await depths(amqp_connection, settings)).values()) == 0

    async def test_status_edrone_already_holds_is_a_noop(
        self, fake, db, make_traces, amqp_connection, pool
    ):
        """A change that repeats what edrone holds is acked as a no-op without a call: known
        from the forwarder's last successful trace or from an old ledger row of edrone's."""
        settings = await make_traces()
        await publish_platform(
            amqp_connection, settings, [shop_event(status=1, at=-timedelta(seconds=10))]
        )
        first = await forward_burst(amqp_connection, pool, settings)
        assert (first.counters.sent, len(fake.requests)) == (1, 1)
        # edrone told the bridge an hour ago that ola unsubscribed.
        await db.execute(
            "INSERT INTO subscribers (app_id, channel, address, status, reason, event_id,"
            " event_date, ordered_at, updated_at) VALUES ($1, 'email', 'ola@example.com', 0, 1,"
            " 'evt-1', now() - interval '1 hour', now() - interval '1 hour',"
            " now() - interval '1 hour')",
            TEST_APP_ID,
        )
        repeats = [shop_event(status=1), shop_event("ola@example.com", status=0)]
        await publish_platform(amqp_connection, settings, repeats)

        again = await forward_burst(amqp_connection, pool, settings)

        assert len(fake.requests) == 1
        assert (again.counters.sent, again.counters.skipped) == (0, Counter({"noop": 2}))
        assert sum((await depths(amqp_connection, settings)).values()) == 0

    async def test_change_older_than_the_last_trace_is_not_sent(
        self, fake, make_traces, amqp_connection, pool
    ):
        """A late change older than the last one sent never overwrites it at edrone."""
        settings = await make_traces()
        await publish_platform(amqp_connection, settings, [shop_event(status=1)])
        await forward_burst(amqp_connection, pool, settings)
        await publish_platform(
            amqp_connection, settings, [shop_event(status=0, at=-timedelta(minutes=1))]
        )

        late = await forward_burst(amqp_connection, pool, settings)

        assert [r.form["subscriber_status"] for r in fake.requests] == ["1"]
        assert late.counters.skipped == Counter({"older": 1})

    async def test_shop_repeating_edrones_status_is_not_sent_back(
        self, fake, db, make_traces, amqp_connection, pool
    ):
        """A shop change that repeats the status edrone's ledger holds is acked as a no-op,
        unsent: edrone is known to hold it (the ledger seeds a new address's sync state); a
        different status is sent, exactly once."""
        settings = await make_traces()
        await db.execute(
            "INSERT INTO subscribers (app_id, channel, address, status, reason, event_id,"
            " event_date, ordered_at) VALUES ($1, 'email', 'jan.kowalski@example.com', 0, 1,"
            " 'evt-123', now() - interval '2 seconds', now() - interval '2 seconds')",
            TEST_APP_ID,
        )
        await publish_platform(amqp_connection, settings, [shop_event(status=0)])

        echo = await forward_burst(amqp_connection, pool, settings)

        assert fake.requests == []
        assert (echo.counters.sent, echo.counters.skipped) == (0, Counter({"noop": 1}))

        await publish_platform(amqp_connection, settings, [shop_event(status=1)])
        change = await forward_burst(amqp_connection, pool, settings)

        assert [r.form["subscriber_status"] for r in fake.requests] == ["1"]
        assert (change.counters.sent, change.counters.skipped) == (1, Counter())


async def test_rate_limit_holds_under_a_burst(fake, make_traces, amqp_connection, pool):
    """1,000 queued changes at 100 requests/s and 20 in flight: edrone never receives more
    than 100 requests in any one-second window, and every change is delivered once."""
    settings = await make_traces(rate_limit_per_s=100, concurrency=20)
    emails = [f"user{n:04d}@example.com" for n in range(1000)]
    await publish_platform(amqp_connection, settings, [shop_event(e) for e in emails])

    consumer = await forward_burst(amqp_connection, pool, settings, timeout_s=30)

    times = sorted(r.received_monotonic for r in fake.requests)
    # Every window [t, t + 1 s) starting at a request: the busiest one starts at a request.
    per_window = [bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)]
    print(
        f"\nrate limit: {len(times)} requests in {times[-1] - times[0]:.2f} s,"
        f" at most {max(per_window)} in any 1-s window,"
        f" {consumer.spec.handler.rate_limit_waits} waits"
    )
    assert max(per_window) <= 100
    # The first 100 found a slot at once and are not counted as waits; later ones did wait.
    assert 0 < consumer.spec.handler.rate_limit_waits <= 900
    assert accepted(fake) == Counter(dict.fromkeys(emails, 1))
    assert len(times) == 1000
    assert consumer.counters.sent == 1000


class TestDatesAndAddresses:
    async def test_future_occurred_at_is_clamped_and_does_not_freeze(
        self, fake, make_traces, amqp_connection, pool, db
    ):
        """A shop change dated year 9999 is sent, but ordered and told to edrone as made no
        later than its consumption plus the skew (here 0.5 s); after that a change made now is
        sent, not skipped as older (docs/design.md promise 6)."""
        settings = await make_traces()
        settings = settings.model_copy(update={"max_clock_skew_s": 0.5})
        future = datetime(9999, 12, 31, 23, 59, tzinfo=UTC)
        before = datetime.now(UTC)
        await publish_platform(amqp_connection, settings, [shop_event(status=0, at=future)])

        first = await forward_burst(amqp_connection, pool, settings)

        assert first.counters.sent == 1
        [sent] = fake.requests
        told = datetime.strptime(sent.form["event_utc_date"], "%Y-%m-%d %H:%M:%S")
        assert before.replace(microsecond=0, tzinfo=None) <= told < datetime(2100, 1, 1)
        stored = await db.fetchval("SELECT made_at FROM sync_state WHERE channel = 'email'")
        assert stored <= datetime.now(UTC) + timedelta(seconds=0.5)

        await asyncio.sleep(0.6)
        await publish_platform(amqp_connection, settings, [shop_event(status=1)])
        second = await forward_burst(amqp_connection, pool, settings)

        assert second.counters.sent == 1
        assert [r.form["subscriber_status"] for r in fake.requests] == ["0", "1"]

    async def test_occurred_at_before_the_floor_is_dead_lettered(
        self, fake, make_traces, amqp_connection, pool
    ):
        """A shop change dated before 2000-01-01 comes from a clock that is wrong: it is
        dead-lettered naming occurred_at, never sent."""
        settings = await make_traces()
        names = topology(settings)
        old = datetime(1970, 1, 1, tzinfo=UTC)
        await publish_platform(amqp_connection, settings, [shop_event(status=0, at=old)])

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert (consumer.counters.dead_lettered, fake.requests) == (1, [])
        [dead] = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        assert "occurred_at" in dead.headers[HEADER_ERROR]

    async def test_idna_forms_are_one_customer(self, fake, make_traces, amqp_connection, pool):
        """The shop's spellings of one mailbox (xn-- or Unicode domain, any case) are one
        address: coalesced into one trace, sent in the one form the ingress stores too."""
        settings = await make_traces()
        events = [
            shop_event("User@XN--BCHER-KVA.DE", status=0, at=-timedelta(seconds=2)),
            shop_event("user@bücher.de", status=1),
        ]
        await publish_platform(amqp_connection, settings, events)

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert consumer.counters.skipped == Counter({"coalesced": 1})
        assert [(r.form["email"], r.form["subscriber_status"]) for r in fake.requests] == [
            ("user@bücher.de", "1")
        ]

    async def test_typed_forms_of_one_phone_are_one_address(
        self, fake, make_traces, amqp_connection, pool, db
    ):
        """The shop's spellings of one phone (with or without the country code, spaced or
        not) are one SMS address: coalesced into one trace, the phone sent in E.164."""
        settings = await make_traces()
        events = [
            shop_event(
                status=1, phone="+48 500 100 200", sms_subscriber_status=0, at=-timedelta(seconds=2)
            ),
            shop_event(status=1, phone="500100200", sms_subscriber_status=1),
        ]
        await publish_platform(amqp_connection, settings, events)

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert consumer.counters.skipped == Counter({"coalesced": 1})
        assert [(r.form["phone"], r.form["sms_subscriber_status"]) for r in fake.requests] == [
            ("+48500100200", "1")
        ]
        states = await db.fetch("SELECT address FROM sync_state WHERE channel = 'sms'")
        assert [r["address"] for r in states] == ["+48500100200"]

    async def test_national_phone_is_read_in_the_configured_region(
        self, fake, make_traces, amqp_connection, pool
    ):
        """EDRONE_BRIDGE_PHONE_REGION reads the shop's numbers typed without a country code."""
        settings = await make_traces()
        settings = settings.model_copy(update={"phone_region": "DE"})
        await publish_platform(
            amqp_connection, settings, [shop_event(phone="030 123456", sms_subscriber_status=1)]
        )

        await forward_burst(amqp_connection, pool, settings)

        assert [r.form["phone"] for r in fake.requests] == ["+4930123456"]

    async def test_invalid_phone_is_dead_lettered_and_changes_nothing(
        self, fake, make_traces, amqp_connection, pool, db
    ):
        """A shop change whose phone is no valid number breaks the contract: dead-lettered at
        once, x-error naming the field and never the number; nothing sent, nothing stored."""
        settings = await make_traces()
        names = topology(settings)
        broken = shop_event(phone="(0) 500-100-200", sms_subscriber_status=0)
        await publish_platform(amqp_connection, settings, [broken])

        consumer = await forward_burst(amqp_connection, pool, settings)

        assert (consumer.counters.dead_lettered, fake.requests) == (1, [])
        [dead] = await take_all(amqp_connection, names.dead_letter_queue(names.traces_queue))
        error = dead.headers[HEADER_ERROR]
        assert error.startswith("invalid platform event: phone: ")
        assert "500" not in error
        assert await db.fetchval("SELECT count(*) FROM sync_state") == 0
        assert await db.fetchval("SELECT count(*) FROM sync_history") == 0
