"""The generic consumer runtime with hand-written handlers: batching, retries, outcomes,
dead-letter headers and lifecycle, against the real broker."""

from __future__ import annotations

import asyncio

import pytest

from bridge.amqp import topology
from bridge.headers import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_FIRST_FAILURE, dead_letter_headers
from bridge.part_settings import ConsumerOptions
from consumers.outcomes import Outcome, Reject, RetryLater
from consumers.runtime import Consumer
from consumers.spec import ConsumerSpec
from tests.support.consumers import publish, ready_count, run_burst, take_all, wait_until


class Recorder:
    """A handler that records each batch's bodies and answers with scripted behaviour."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.batches = []

    async def __call__(self, deliveries):
        self.batches.append([d.body for d in deliveries])
        if self.failures:
            raise self.failures.pop(0)
        return [Reject("odd") if d.body.endswith(b"!") else Outcome.APPLIED for d in deliveries]


def make_runtime(connection, settings, handler, *, timeout_s=30.0, probe=None, **options):
    """A consumer of the subscriptions queue with ``handler``; keyword arguments override
    the small batches and short backoffs of these tests' ConsumerOptions."""
    names = topology(settings)
    spec = ConsumerSpec(names.subscriptions_queue, handler, timeout_s, probe=probe)
    fast = {
        "batch_size": 10,
        "prefetch": 20,
        "flush_interval_ms": 20,
        "retry_initial_backoff_s": 0.02,
        **options,
    }
    return Consumer(
        connection,
        spec,
        ConsumerOptions(**fast),
        topology=names,
        publish_timeout_s=settings.publish_timeout_s,
    )


def bodies(count):
    return [f"message {n}".encode() for n in range(count)]


async def test_batches_flush_at_batch_size(broker, settings):
    """Ready messages are handed over in full batches of batch_size, the rest in a last one."""
    await publish(broker, settings, bodies(25))
    handler = Recorder()

    consumer = await run_burst(make_runtime(broker, settings, handler))

    assert [len(batch) for batch in handler.batches] == [10, 10, 5]
    assert [body for batch in handler.batches for body in batch] == bodies(25)
    assert (consumer.counters.applied, consumer.counters.batches) == (25, 3)


async def test_partial_batch_flushes_after_the_interval(broker, settings):
    """A lone message does not wait for a full batch: it is handled after flush_interval."""
    handler = Recorder()
    async with asyncio.timeout(10), make_runtime(broker, settings, handler) as consumer:
        run = asyncio.create_task(consumer.run())
        loop = asyncio.get_running_loop()
        started = loop.time()
        await publish(broker, settings, bodies(1))
        await wait_until(lambda: consumer.counters.applied >= 1)
        elapsed = loop.time() - started
        await consumer.stop()
        await run
    assert handler.batches == [bodies(1)]
    assert elapsed < 1.0


async def test_service_error_gets_the_same_batch_again(broker, settings):
    """A RetryLater (the service's error) retries the whole batch in memory: the same
    messages, never redelivered by the broker, acked once the handler succeeds."""
    await publish(broker, settings, bodies(5))
    handler = Recorder(
        RetryLater("database away", delay_s=0.01), RetryLater("deadlock", delay_s=0.01)
    )

    consumer = await run_burst(make_runtime(broker, settings, handler))

    assert handler.batches == [bodies(5)] * 3
    assert (consumer.counters.retries, consumer.counters.applied) == (2, 5)
    assert (consumer.counters.splits, consumer.counters.dead_lettered) == (0, 0)
    assert await ready_count(broker, topology(settings).subscriptions_queue) == 0


async def test_other_error_splits_the_batch(broker, settings):
    """Any other error may lie in a message's content: the batch is tried again in halves,
    first half first, without a backoff; here both halves succeed and nothing is lost."""
    await publish(broker, settings, bodies(5))
    handler = Recorder(ValueError("bug"))

    consumer = await run_burst(make_runtime(broker, settings, handler))

    assert handler.batches == [bodies(5), bodies(5)[:2], bodies(5)[2:]]
    assert (consumer.counters.splits, consumer.counters.retries) == (1, 0)
    assert (consumer.counters.applied, consumer.counters.dead_lettered) == (5, 0)
    assert await ready_count(broker, topology(settings).subscriptions_queue) == 0


async def test_slow_handler_is_timed_out_and_retried(broker, settings):
    """A handler call longer than timeout_s is abandoned and the batch retried."""
    calls = []

    async def slow_once(deliveries):
        calls.append(len(deliveries))
        if len(calls) == 1:
            await asyncio.sleep(5)
        return [Outcome.APPLIED] * len(deliveries)

    await publish(broker, settings, bodies(3))
    consumer = await run_burst(make_runtime(broker, settings, slow_once, timeout_s=0.1))

    assert calls == [3, 3]
    assert (consumer.counters.retries, consumer.counters.applied) == (1, 3)


async def test_rejected_outcomes_are_dead_lettered(broker, settings):
    """A Reject outcome sends that message alone to the DLQ; a skip reason is counted."""
    names = topology(settings)

    async def handler(deliveries):
        return [
            Reject("bad body")
            if d.body == b"bad!"
            else "duplicate"
            if d.body == b"dup"
            else Outcome.APPLIED
            for d in deliveries
        ]

    await publish(broker, settings, [b"ok", b"bad!", b"dup"])
    consumer = await run_burst(make_runtime(broker, settings, handler))

    counters = consumer.counters
    assert (counters.applied, counters.skipped["duplicate"], counters.dead_lettered) == (1, 1, 1)
    assert "skipped={'duplicate': 1}" in repr(consumer)
    [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
    assert (dead.body, dead.headers[HEADER_ERROR]) == (b"bad!", "bad body")


async def test_wrong_number_of_outcomes_is_never_taken(broker, settings):
    """A handler answering for fewer messages than it got is a bug: its answer is never
    used for the batch (no message gets another's outcome); the batch is narrowed down like
    any failure, and each message alone gets the outcome answered for it."""
    calls = []

    async def short(deliveries):
        calls.append(len(deliveries))
        return ["duplicate" if len(deliveries) > 1 else Outcome.APPLIED]

    await publish(broker, settings, bodies(3))
    consumer = await run_burst(make_runtime(broker, settings, short))

    assert calls == [3, 1, 2, 1, 1]
    assert (consumer.counters.applied, consumer.counters.skipped["duplicate"]) == (3, 0)
    assert await ready_count(broker, topology(settings).subscriptions_queue) == 0


async def test_stop_before_run_returns_at_once(broker, settings):
    """A consumer stopped before running returns from run() immediately and closes cleanly."""
    consumer = make_runtime(broker, settings, Recorder())
    async with asyncio.timeout(5), consumer:
        await consumer.stop()
        await consumer.run()
    assert consumer.counters.batches == 0


async def test_run_requires_the_context(broker, settings):
    """run() outside ``async with`` fails loudly instead of waiting forever."""
    with pytest.raises(RuntimeError, match="async with"):
        await make_runtime(broker, settings, Recorder()).run()


class TestIsolation:
    """docs/design.md promise 7: no message blocks its queue."""

    @staticmethod
    def failing_on(marker, error):
        """A handler that fails, with ``error``, every batch holding a body with ``marker``."""
        calls = []

        async def handler(deliveries):
            calls.append([d.body for d in deliveries])
            if any(marker in d.body for d in deliveries):
                raise error
            return [Outcome.APPLIED] * len(deliveries)

        handler.calls = calls
        return handler

    async def test_content_error_is_narrowed_down_to_its_message(self, broker, settings):
        """A batch failing for a reason that may lie in one message is split in halves until
        that message stands alone: it alone is dead-lettered with the error, every message
        behind and beside it is applied, in a bounded number of handler calls."""
        names = topology(settings)
        good = bodies(20)
        await publish(broker, settings, [*good[:7], b"poison 7", *good[7:]])
        handler = self.failing_on(b"poison", ValueError("cannot store that"))

        consumer = await run_burst(make_runtime(broker, settings, handler))

        counters = consumer.counters
        assert (counters.applied, counters.dead_lettered, counters.isolated) == (20, 1, 1)
        assert counters.retries == 0  # no backoff: the error is the message's, not the service's
        # 10 + 10 + 1 messages: the poisoned batch of 10 takes at most 2 calls per halving.
        assert len(handler.calls) <= 3 + 2 * 4
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert dead.body == b"poison 7"
        assert dead.headers[HEADER_ERROR] == "failed alone: ValueError: cannot store that"
        assert dead.headers[HEADER_ATTEMPTS] == 1
        assert await ready_count(broker, names.subscriptions_queue) == 0

    async def test_several_poisons_in_one_batch(self, broker, settings):
        """Each poisoned message is found alone; the good ones all go through."""
        names = topology(settings)
        messages = [b"poison %d" % n if n in (0, 4, 9) else b"ok %d" % n for n in range(10)]
        await publish(broker, settings, messages)
        handler = self.failing_on(b"poison", ValueError("bad"))

        consumer = await run_burst(make_runtime(broker, settings, handler))

        assert (consumer.counters.applied, consumer.counters.dead_lettered) == (7, 3)
        dead = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert sorted(m.body for m in dead) == [b"poison 0", b"poison 4", b"poison 9"]

    async def test_service_error_that_never_ends_dead_letters_whatever_the_cause(
        self, broker, settings
    ):
        """A message in max_batch_failures failed batches (counted: the service answered) is
        narrowed down like a content error and, failing alone once more, dead-lettered; the
        messages that shared its batches are applied."""
        names = topology(settings)
        await publish(broker, settings, [*bodies(6), b"stuck 6", *bodies(9)[7:]])
        handler = self.failing_on(b"stuck", RetryLater("deadlock", delay_s=0.001))

        consumer = await run_burst(make_runtime(broker, settings, handler, max_batch_failures=3))

        counters = consumer.counters
        assert (counters.applied, counters.dead_lettered, counters.isolated) == (8, 1, 1)
        assert counters.retries == 2  # two retries of the whole batch, then halves
        [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
        assert dead.body == b"stuck 6"
        assert dead.headers[HEADER_ERROR].startswith("failed 3 batches, the last alone: deadlock")

    async def test_service_not_reached_never_counts(self, broker, settings):
        """Failures where the service was not reached (RetryLater(counts=False), or a probe
        saying it does not answer) retry the batch however often, and dead-letter nothing."""
        answering = []

        async def probe():
            answering.append(False)
            return False

        handler = Recorder(
            *[RetryLater("connection refused", delay_s=0.001, counts=False)] * 4,
            *[RetryLater("timeout", delay_s=0.001)] * 4,
        )
        await publish(broker, settings, bodies(5))
        consumer = make_runtime(broker, settings, handler, probe=probe, max_batch_failures=2)
        await run_burst(consumer)

        assert handler.batches == [bodies(5)] * 9
        assert len(answering) == 4  # asked only about the failures that would count
        assert (consumer.counters.applied, consumer.counters.dead_lettered) == (5, 0)
        assert consumer.counters.splits == 0


class TestDeadLetterHeaders:
    def test_first_failure(self):
        """A first failure carries the error, one attempt, equal times and the queue."""
        headers = dead_letter_headers({"trace": "t-1"}, "boom", "q")
        assert headers["trace"] == "t-1"
        assert (headers[HEADER_ERROR], headers[HEADER_ATTEMPTS]) == ("boom", 1)
        assert headers[HEADER_FIRST_FAILURE] == headers["x-dead-lettered-at"]
        assert headers["x-original-queue"] == "q"

    def test_replayed_failure_keeps_history(self):
        """A replayed message that fails again keeps its first-failure time and adds up its
        attempts, the broker's redeliveries included."""
        original = {
            HEADER_ATTEMPTS: 2,
            HEADER_FIRST_FAILURE: "2024-01-15T10:30:00.000+00:00",
            "x-delivery-count": 3,
        }
        headers = dead_letter_headers(original, "again", "q")
        assert headers[HEADER_ATTEMPTS] == 6
        assert headers[HEADER_FIRST_FAILURE] == "2024-01-15T10:30:00.000+00:00"
        assert "x-delivery-count" not in headers

    def test_long_error_is_truncated(self):
        """An error text cannot blow up the header table."""
        assert len(dead_letter_headers(None, "x" * 10_000, "q")[HEADER_ERROR]) == 1_000
