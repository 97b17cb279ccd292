"""The generic consumer runtime with hand-written handlers: batching, retries, outcomes,
dead-letter headers and lifecycle, against the real broker."""

from __future__ import annotations

import asyncio

import pytest

from bridge.amqp import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_FIRST_FAILURE, topology
from consumers.deadletter import dead_letter_headers
from consumers.errors import Reject, RetryLater
from consumers.runtime import APPLIED, Consumer, ConsumerSpec
from tests.consumers.support import publish, ready_count, run_burst, take_all, wait_until


class Recorder:
    """A handler that records each batch's bodies and answers with scripted behaviour."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.batches = []

    async def __call__(self, deliveries):
        self.batches.append([d.body for d in deliveries])
        if self.failures:
            raise self.failures.pop(0)
        return [Reject("odd") if d.body.endswith(b"!") else APPLIED for d in deliveries]


def make_runtime(connection, settings, handler, **options):
    names = topology(settings)
    spec = ConsumerSpec(queue=names.subscriptions_queue, handler=handler, batch_size=10)
    options = {"flush_interval_s": 0.02, "retry_initial_backoff_s": 0.02, **options}
    return Consumer(connection, spec, topology=names, **options)


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


async def test_failing_handler_gets_the_same_batch_again(broker, settings):
    """An unexpected error and a RetryLater each retry the whole batch in memory: the same
    messages, never redelivered by the broker, acked once the handler succeeds."""
    await publish(broker, settings, bodies(5))
    handler = Recorder(ValueError("bug"), RetryLater("database away", delay_s=0.01))

    consumer = await run_burst(make_runtime(broker, settings, handler))

    assert handler.batches == [bodies(5)] * 3
    assert (consumer.counters.retries, consumer.counters.applied) == (2, 5)
    assert await ready_count(broker, topology(settings).subscriptions_queue) == 0


async def test_slow_handler_is_timed_out_and_retried(broker, settings):
    """A handler call longer than timeout_s is abandoned and the batch retried."""
    calls = []

    async def slow_once(deliveries):
        calls.append(len(deliveries))
        if len(calls) == 1:
            await asyncio.sleep(5)
        return [APPLIED] * len(deliveries)

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
            else APPLIED
            for d in deliveries
        ]

    await publish(broker, settings, [b"ok", b"bad!", b"dup"])
    consumer = await run_burst(make_runtime(broker, settings, handler))

    counters = consumer.counters
    assert (counters.applied, counters.skipped["duplicate"], counters.dead_lettered) == (1, 1, 1)
    assert "skipped={'duplicate': 1}" in repr(consumer)
    [dead] = await take_all(broker, names.dead_letter_queue(names.subscriptions_queue))
    assert (dead.body, dead.headers[HEADER_ERROR]) == (b"bad!", "bad body")


async def test_wrong_number_of_outcomes_is_not_acked(broker, settings):
    """A handler answering for fewer messages than it got is a bug: nothing is acked."""

    async def short(deliveries):
        return [APPLIED]

    await publish(broker, settings, bodies(3))
    consumer = make_runtime(broker, settings, short, drain_timeout_s=0.2)
    async with asyncio.timeout(10), consumer:
        run = asyncio.create_task(consumer.run())
        await wait_until(lambda: consumer.counters.retries >= 2)
        await consumer.stop()
        await run
    queue = topology(settings).subscriptions_queue
    await wait_until(lambda: ready_count(broker, queue), 5)
    assert await ready_count(broker, queue) == 3
    assert consumer.counters.applied == 0


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
