"""Dead-letter operations against the real broker: list and show leave every message in place,
replay moves messages back only after a confirmed republish (an interrupted replay loses
nothing), purge removes exactly what it is asked to; and the ``dlq`` commands around them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.amqp import (
    Topology,
    declare_dead_letter_queue,
    declare_topology,
    declare_trace_topology,
    topology,
)
from bridge.cli.dlq import format_age
from bridge.headers import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_ORIGINAL_QUEUE,
    HEADER_REPLAYED_AT,
    dead_letter_headers,
    replay_headers,
)
from bridge.ops import dlq
from bridge.ops.dlq_messages import fallback_id
from tests.support.apps import TEST_APP_ID
from tests.support.cli import REPO, cli_env, run_cli, run_cli_async
from tests.support.consumers import take_all
from tests.support.proxy import TcpProxy

ERROR_400 = 'HTTP 400: {"error": "Missing required field: email"}'


def event_body(event_id: str) -> bytes:
    """A status change as the ingress publishes it (the fields the DLQ tools never parse)."""
    return json.dumps(
        {
            "app_id": TEST_APP_ID,
            "channel": "email",
            "address": f"{event_id}@example.com",
            "status": 0,
            "event_id": event_id,
            "event_date": "2024-01-15T10:30:00Z",
        }
    ).encode()


class Broker:
    """The test's own connection: declares the topology, dead-letters messages the way the
    runtime does, and reads queue depths and contents."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, settings) -> None:
        self.connection = connection
        self.settings = settings
        self.names: Topology = topology(settings)

    @property
    def dlq(self) -> str:
        return self.names.dead_letter_queue(self.names.subscriptions_queue)

    async def dead_letter(
        self,
        message_id: str | None = None,
        *,
        body: bytes | None = None,
        error: str = ERROR_400,
        attempts: int = 1,
        work_queue: str | None = None,
        original_queue: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Put one message into the work queue's DLQ as the consumer runtime does: a confirmed
        copy through the dead-letter exchange, with the runtime's headers (``original_queue``
        overrides the x-original-queue it writes)."""
        work_queue = work_queue or self.names.subscriptions_queue
        original = dict(headers or {})
        if attempts > 1:
            original[HEADER_ATTEMPTS] = attempts - 1  # dead_letter_headers adds this one
        stored = dead_letter_headers(original, error, original_queue or work_queue)
        body = body if body is not None else event_body(message_id or uuid.uuid4().hex)
        routing_key = self.names.dead_letter_queue(work_queue)
        if message_id is None:
            await self._publish_without_message_id(body, stored, routing_key)
            return
        message = aio_pika.Message(
            body,
            headers=stored,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
        )
        channel = await self.connection.channel(publisher_confirms=True)
        async with channel:
            exchange = await channel.get_exchange(self.names.dead_letter_exchange)
            confirmation = await exchange.publish(message, routing_key, mandatory=True, timeout=5)
            assert isinstance(confirmation, Basic.Ack), confirmation

    async def _publish_without_message_id(
        self, body: bytes, headers: dict[str, Any], routing_key: str
    ) -> None:
        """aiormq gives every publish a random message_id, other clients (PHP's, say) do not:
        frames written by hand are how such a message gets into the DLQ here."""
        before = await self.depth(routing_key)
        channel = await self.connection.channel(publisher_confirms=False)
        async with channel:
            raw = await channel.get_underlay_channel()
            properties = Basic.Properties(delivery_mode=2, headers=headers)
            frames = [
                Basic.Publish(exchange=self.names.dead_letter_exchange, routing_key=routing_key),
                ContentHeader(properties=properties, body_size=len(body)),
                ContentBody(body),
            ]
            written = asyncio.get_running_loop().create_future()
            await raw.write_queue.put(ChannelFrame.marshall(raw.number, frames, written))
            await asyncio.wait_for(written, 5)
        assert await self.settled_depth(routing_key, before + 1) == before + 1

    async def dead_letter_many(self, count: int, prefix: str = "evt") -> list[str]:
        ids = [f"{prefix}-{i:03d}" for i in range(count)]
        for message_id in ids:
            await self.dead_letter(message_id)
        return ids

    async def depth(self, queue: str) -> int:
        channel = await self.connection.channel()
        async with channel:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)

    async def settled_depth(self, queue: str, expected: int, timeout_s: float = 5.0) -> int:
        """The depth once it reaches ``expected`` (returned messages are requeued
        asynchronously), or whatever it is after ``timeout_s``."""
        for _ in range(round(timeout_s / 0.05)):
            if (depth := await self.depth(queue)) == expected:
                return depth
            await asyncio.sleep(0.05)
        return await self.depth(queue)

    async def take_all(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        return await take_all(self.connection, queue)


@pytest.fixture
async def broker(amqp_connection, settings) -> Broker:
    """The subscription topology (work queue and DLQ) declared; the traces DLQ declared too,
    but not the traces work queue (as before the trace forwarder's first start)."""
    channel = await amqp_connection.channel()
    async with channel:
        await declare_topology(channel, settings)
        names = topology(settings)
        await declare_dead_letter_queue(channel, names, names.traces_queue)
    return Broker(amqp_connection, settings)


def on_a_terminal(settings, typed: str) -> tuple[int, str]:
    """``dlq purge subscriptions --all`` with a terminal for its stdin and stdout, ``typed``
    on it; (exit code, what the terminal showed)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "dlq", "purge", "subscriptions", "--all"],
        stdin=follower,
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env=cli_env(**cli_variables(settings)),
        cwd=REPO,
    )
    os.close(follower)
    os.write(leader, typed.encode())
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the process closed the terminal
        while chunk := os.read(leader, 4096):
            shown += chunk
    os.close(leader)
    return process.wait(timeout=60), shown.decode(errors="replace")


def cli_variables(settings) -> dict[str, str]:
    return {
        "EDRONE_BRIDGE_AMQP_URL": settings.amqp_url.get_secret_value(),
        "EDRONE_BRIDGE_AMQP_PREFIX": settings.amqp_prefix,
        "EDRONE_BRIDGE_LOG_LEVEL": "warning",
    }


class TestQueueNames:
    def test_short_and_full_names_resolve_to_the_dead_letter_queue(self):
        """``subscriptions``, ``subscriptions.dlq`` and the full DLQ name all mean that DLQ."""
        names = Topology("shop1")
        for given in ("subscriptions", "subscriptions.dlq", "shop1.subscriptions.dlq"):
            assert dlq.resolve_queue(names, given) == (
                "shop1.subscriptions.dlq",
                "shop1.subscriptions",
            )
        assert dlq.resolve_queue(names, "traces") == ("shop1.traces.dlq", "shop1.traces")

    @pytest.mark.parametrize(
        "name", ["shop1.subscriptions", "other.subscriptions.dlq", "nope", "shop1.traces.retry"]
    )
    def test_anything_else_is_refused(self, name):
        """A work queue, another deployment's DLQ or an unknown name is not a DLQ of ours."""
        with pytest.raises(dlq.UnknownQueue, match="not a dead-letter queue of this deployment"):
            dlq.resolve_queue(Topology("shop1"), name)


class TestHeaders:
    def test_replay_headers_reset_every_failure_record(self):
        """A replayed message carries none of its failure headers (runtime's or broker's), keeps
        the others, and says when it was replayed."""
        stored = {
            **dead_letter_headers({"trace": "t-1", HEADER_ATTEMPTS: 4}, "boom", "q"),
            "x-death": [{"reason": "delivery_limit", "queue": "q", "count": 1}],
            "x-delivery-count": 3,
            "x-first-death-reason": "delivery_limit",
            "x-first-death-queue": "q",
            "x-last-death-reason": "delivery_limit",
        }
        now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert replay_headers(stored, now) == {
            "trace": "t-1",
            HEADER_REPLAYED_AT: "2026-01-02T03:04:05.000+00:00",
        }

    def test_fallback_id_ignores_the_dlq_delivery_count(self):
        """A message without message_id keeps its id however often it is read."""
        headers = {"x-error": "boom", "x-death": [{"time": datetime(2026, 1, 1, tzinfo=UTC)}]}
        first = fallback_id(b"body", headers)
        assert first == fallback_id(b"body", {**headers, "x-delivery-count": 7})
        assert first != fallback_id(b"other body", headers)
        assert first.startswith("sha256-")

    @pytest.mark.parametrize(
        ("seconds", "shown"),
        [(None, "-"), (0.4, "0s"), (59, "59s"), (61, "1m01s"), (3_700, "1h01m"), (90_000, "1d01h")],
    )
    def test_ages_read_at_a_glance(self, seconds, shown):
        """Ages are shown in their two largest units."""
        assert format_age(seconds) == shown


class TestList:
    async def test_list_describes_each_message_in_order_and_leaves_them(self, broker, settings):
        """``list`` gives the count and, in queue order, each message's id, attempts, last
        error, age and original queue; every message is still in the DLQ afterwards."""
        await broker.dead_letter("evt-a", attempts=1, error=ERROR_400)
        await broker.dead_letter("evt-b", attempts=5, error="TimeoutError()")
        await broker.dead_letter("evt-c", attempts=2, error="unknown app_id 'x'")
        listing = await dlq.list_messages(settings, "subscriptions")
        assert (listing.queue, listing.count) == (broker.dlq, 3)
        assert [(m.id, m.attempts, m.error) for m in listing.messages] == [
            ("evt-a", 1, ERROR_400),
            ("evt-b", 5, "TimeoutError()"),
            ("evt-c", 2, "unknown app_id 'x'"),
        ]
        now = datetime.now(UTC)
        for message in listing.messages:
            assert message.original_queue == broker.names.subscriptions_queue
            assert 0 <= message.age_s(now) < 30
        assert await broker.settled_depth(broker.dlq, 3) == 3

    async def test_ids_are_stable_across_reads(self, broker, settings):
        """A message without message_id gets the same fallback id on every read, although
        each read raises the DLQ's own delivery count."""
        await broker.dead_letter(None, body=b"not json at all")
        await broker.dead_letter("evt-x")
        first = [m.id for m in (await dlq.list_messages(settings, "subscriptions")).messages]
        await broker.settled_depth(broker.dlq, 2)
        second = [m.id for m in (await dlq.list_messages(settings, "subscriptions")).messages]
        assert first == second
        assert first[0].startswith("sha256-") and first[1] == "evt-x"

    async def test_broker_dead_lettered_message_tells_its_story(
        self, amqp_connection, make_settings
    ):
        """A message the broker dead-lettered (delivery limit) shows the reason, the deliveries
        it took, its age from x-death and its work queue."""
        settings = make_settings(subscriptions={"delivery_limit": 1})
        channel = await amqp_connection.channel()
        names = topology(settings)
        async with channel:
            await declare_topology(channel, settings)
            await channel.default_exchange.publish(
                aio_pika.Message(event_body("evt-poison"), message_id="evt-poison"),
                names.subscriptions_queue,
                timeout=5,
            )
            work = await channel.get_queue(names.subscriptions_queue)
            for _ in range(2):  # the limit, then one more: dead-lettered by the broker
                delivery = await work.get(timeout=5)
                await delivery.nack(requeue=True)
        broker = Broker(amqp_connection, settings)
        assert await broker.settled_depth(broker.dlq, 1) == 1
        [message] = (await dlq.list_messages(settings, "subscriptions")).messages
        assert message.id == "evt-poison"
        assert message.attempts == 2
        assert message.error.startswith("delivery_limit (dead-lettered by the broker)")
        assert message.original_queue == names.subscriptions_queue
        assert 0 <= message.age_s(datetime.now(UTC)) < 30

    async def test_list_command_table_and_json(self, broker, settings):
        """``dlq list`` prints a table for people and, with ``--json``, one document for
        machines; neither removes anything."""
        await broker.dead_letter("evt-a", attempts=3)
        await broker.dead_letter("evt-b", error="line one\nline two")
        code, stdout, stderr = await run_cli_async(
            "dlq", "list", "subscriptions", **cli_variables(settings)
        )
        assert code == 0, stderr
        lines = stdout.splitlines()
        assert lines[0] == f"{broker.dlq}: 2 messages"
        assert lines[1].split() == ["ID", "ATTEMPTS", "AGE", "ORIGINAL", "QUEUE", "LAST", "ERROR"]
        assert lines[2].split()[:2] == ["evt-a", "3"]
        assert lines[3].endswith("line one line two")
        code, stdout, stderr = await run_cli_async(
            "dlq", "list", broker.dlq, "--json", **cli_variables(settings)
        )
        assert code == 0, stderr
        document = json.loads(stdout)
        assert (document["queue"], document["count"]) == (broker.dlq, 2)
        first = document["messages"][0]
        assert (first["id"], first["attempts"], first["error"]) == ("evt-a", 3, ERROR_400)
        assert first["original_queue"] == broker.names.subscriptions_queue
        assert first["age_s"] >= 0 and first["first_failure_at"]
        assert await broker.settled_depth(broker.dlq, 2) == 2

    async def test_an_empty_queue_lists_nothing(self, broker, settings):
        """An empty DLQ lists as zero messages, at once."""
        listing = await dlq.list_messages(settings, "traces")
        assert (listing.count, listing.messages) == (0, [])


class TestShow:
    async def test_show_prints_headers_and_pretty_body(self, broker, settings):
        """``dlq show`` prints the failure, every header and the body as indented JSON; the
        message stays."""
        await broker.dead_letter("evt-a")
        await broker.dead_letter("evt-b", attempts=4, headers={"trace": "t-1"})
        code, stdout, stderr = await run_cli_async(
            "dlq", "show", "subscriptions", "evt-b", **cli_variables(settings)
        )
        assert code == 0, stderr
        assert "id:              evt-b" in stdout
        assert "attempts:        4" in stdout
        assert f"last error:      {ERROR_400}" in stdout
        assert "  trace: t-1" in stdout
        assert f"  {HEADER_ORIGINAL_QUEUE}: {broker.names.subscriptions_queue}" in stdout
        assert "body (json, " in stdout
        assert '  "event_id": "evt-b",' in stdout
        assert await broker.settled_depth(broker.dlq, 2) == 2

    async def test_show_json(self, broker, settings):
        """``dlq show --json`` gives headers, properties and the parsed body."""
        await broker.dead_letter("evt-a", attempts=2)
        code, stdout, stderr = await run_cli_async(
            "dlq", "show", "subscriptions", "evt-a", "--json", **cli_variables(settings)
        )
        assert code == 0, stderr
        document = json.loads(stdout)
        assert document["attempts"] == 2
        assert document["headers"][HEADER_ATTEMPTS] == 2
        assert document["properties"]["content_type"] == "application/json"
        assert (document["body_format"], document["body"]["event_id"]) == ("json", "evt-a")

    async def test_unknown_id_fails(self, broker, settings):
        """Showing an id the queue does not hold exits 1 and says so."""
        await broker.dead_letter("evt-a")
        code, _, stderr = await run_cli_async(
            "dlq", "show", "subscriptions", "evt-zzz", **cli_variables(settings)
        )
        assert code == 1
        assert "no message with id 'evt-zzz'" in stderr


class TestReplay:
    async def test_replay_by_id_moves_exactly_that_message_with_attempts_reset(
        self, broker, settings
    ):
        """``replay --id`` republishes only that message to its work queue, persistent, same
        body and message_id, its own headers kept and every failure header gone; the
        others stay in the DLQ."""
        await broker.dead_letter("evt-a")
        await broker.dead_letter("evt-b", attempts=7, headers={"trace": "t-1"})
        await broker.dead_letter("evt-c")
        outcome = await dlq.replay(settings, "subscriptions", ids=["evt-b"])
        assert (outcome.total, outcome.failure, outcome.not_found) == (1, None, [])
        assert outcome.done == {broker.names.subscriptions_queue: 1}
        [back] = await broker.take_all(broker.names.subscriptions_queue)
        assert (back.message_id, back.body) == ("evt-b", event_body("evt-b"))
        assert back.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert back.content_type == "application/json"
        # x-delivery-count: the work queue's own, set on every delivery
        assert set(back.headers) - {"x-delivery-count"} == {"trace", HEADER_REPLAYED_AT}
        assert back.headers["trace"] == "t-1"
        left = [m.id for m in (await dlq.list_messages(settings, "subscriptions")).messages]
        assert left == ["evt-a", "evt-c"]

    async def test_replay_all_command_moves_everything_in_order(self, broker, settings):
        """``dlq replay --all`` moves every message back in queue order and says how many."""
        ids = await broker.dead_letter_many(5)
        code, stdout, stderr = await run_cli_async(
            "dlq", "replay", "subscriptions", "--all", **cli_variables(settings)
        )
        assert code == 0, stderr
        assert stdout.startswith(f"replayed 5 of 5 messages from {broker.dlq} in ")
        assert stdout.rstrip().endswith(f"to {broker.names.subscriptions_queue} (5)")
        assert await broker.depth(broker.dlq) == 0
        back = await broker.take_all(broker.names.subscriptions_queue)
        assert [m.message_id for m in back] == ids
        assert [m.body for m in back] == [event_body(i) for i in ids]
        assert not any(HEADER_ATTEMPTS in m.headers or HEADER_ERROR in m.headers for m in back)

    async def test_rate_bounds_the_speed(self, broker, settings):
        """``--rate 10`` spaces republishes 0.1 s apart: 20 messages take at least 1.9 s."""
        await broker.dead_letter_many(20)
        started = time.monotonic()
        outcome = await dlq.replay(settings, "subscriptions", ids=None, rate_per_s=10)
        elapsed = time.monotonic() - started
        assert outcome.total == 20
        assert 1.9 <= elapsed < 6
        assert await broker.depth(broker.names.subscriptions_queue) == 20

    async def test_message_without_id_replays_under_its_listed_id(self, broker, settings):
        """A message without message_id is replayed by the id ``list`` shows, and carries that
        id as its message_id from then on (so that a broker return can be matched to it)."""
        await broker.dead_letter(None, body=b'{"event_id": "no-message-id"}')
        [listed] = (await dlq.list_messages(settings, "subscriptions")).messages
        await broker.settled_depth(broker.dlq, 1)
        outcome = await dlq.replay(settings, "subscriptions", ids=[listed.id])
        assert outcome.total == 1
        [back] = await broker.take_all(broker.names.subscriptions_queue)
        assert (back.message_id, back.body) == (listed.id, b'{"event_id": "no-message-id"}')

    async def test_unknown_ids_are_reported(self, broker, settings):
        """Ids the DLQ does not hold are named, and the command exits 1; the rest replays."""
        await broker.dead_letter("evt-a")
        code, stdout, stderr = await run_cli_async(
            "dlq",
            "replay",
            "subscriptions",
            "--id",
            "evt-a",
            "evt-nope",
            **cli_variables(settings),
        )
        assert code == 1
        assert stdout.startswith("replayed 1 of the 2 asked (1 in the queue)")
        assert "not found: evt-nope" in stderr

    async def test_missing_work_queue_keeps_the_message(self, broker, settings):
        """Towards a work queue that does not exist, nothing is acked: the message stays in
        the DLQ, the failure is reported and the command exits 1."""
        await broker.dead_letter("evt-t", work_queue=broker.names.traces_queue)
        code, stdout, stderr = await run_cli_async(
            "dlq", "replay", "traces", "--all", **cli_variables(settings)
        )
        assert code == 1
        assert stdout.startswith("replayed 0 of 1 messages")
        assert f"work queue {broker.names.traces_queue} does not exist" in stderr
        traces_dlq = broker.names.dead_letter_queue(broker.names.traces_queue)
        assert await broker.settled_depth(traces_dlq, 1) == 1

    async def test_unroutable_republish_is_not_acked(self, broker, settings, monkeypatch):
        """With the existence check out of the way, a republish no queue takes comes back
        (mandatory) instead of being confirmed: the replay stops, the message stays."""

        async def exists(*args: object) -> None:
            return None

        monkeypatch.setattr(dlq, "_require_queue", exists)
        await broker.dead_letter("evt-t1", work_queue=broker.names.traces_queue)
        await broker.dead_letter("evt-t2", work_queue=broker.names.traces_queue)
        outcome = await dlq.replay(settings, "traces", ids=None)
        assert outcome.total == 0
        assert "did not take it (returned as unroutable)" in outcome.failure
        traces_dlq = broker.names.dead_letter_queue(broker.names.traces_queue)
        assert await broker.settled_depth(traces_dlq, 2) == 2

    async def test_foreign_original_queue_is_refused(self, broker, settings):
        """An x-original-queue naming a queue outside this deployment is not followed."""
        await broker.dead_letter("evt-a", original_queue="someone.elses.queue")
        outcome = await dlq.replay(settings, "subscriptions", ids=None)
        assert outcome.total == 0
        assert "is not a work queue of this deployment" in outcome.failure
        assert await broker.settled_depth(broker.dlq, 1) == 1

    async def test_replay_to_the_trace_queue(self, amqp_connection, settings):
        """Messages of the traces DLQ go back to the traces work queue."""
        channel = await amqp_connection.channel()
        async with channel:
            await declare_trace_topology(channel, settings)
        broker = Broker(amqp_connection, settings)
        await broker.dead_letter("evt-t", work_queue=broker.names.traces_queue)
        outcome = await dlq.replay(settings, "traces", ids=["evt-t"])
        assert outcome.done == {broker.names.traces_queue: 1}
        [back] = await broker.take_all(broker.names.traces_queue)
        assert back.message_id == "evt-t"

    async def test_interrupted_replay_loses_nothing(self, broker, make_settings, settings):
        """A connection cut in the middle of a replay stops it with a reported failure; every
        message is then in the DLQ or in the work queue (a duplicate at worst), none lost."""
        ids = await broker.dead_letter_many(40)
        url = settings.amqp_url.get_secret_value()
        proxy = TcpProxy("127.0.0.1", urlsplit(url).port or 5672)
        await proxy.start()
        try:
            proxied = make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
            replay = asyncio.create_task(
                dlq.replay(proxied, "subscriptions", ids=None, rate_per_s=40)
            )
            await asyncio.sleep(0.4)
            await proxy.cut()
            outcome = await asyncio.wait_for(replay, 15)
        finally:
            await proxy.close()
        assert outcome.failure.startswith("lost the channel to RabbitMQ"), outcome
        assert 0 < outcome.total < 40
        # Unacked deliveries go back to the DLQ once the broker sees the connection gone.
        work = broker.names.subscriptions_queue
        for _ in range(100):
            if await broker.depth(broker.dlq) + await broker.depth(work) >= 40:
                break
            await asyncio.sleep(0.05)
        still_dead = [m.message_id for m in await broker.take_all(broker.dlq)]
        back = [m.message_id for m in await broker.take_all(work)]
        assert set(still_dead) | set(back) == set(ids)
        assert len(back) >= outcome.total


class TestPurge:
    async def test_purge_by_id_removes_exactly_those(self, broker, settings):
        """``purge --id`` removes the named messages and leaves the others, in order."""
        await broker.dead_letter_many(5)
        outcome = await dlq.purge(settings, "subscriptions", ids=["evt-001", "evt-003"])
        assert (outcome.total, outcome.not_found) == (2, [])
        left = [m.id for m in (await dlq.list_messages(settings, "subscriptions")).messages]
        assert left == ["evt-000", "evt-002", "evt-004"]
        assert await broker.depth(broker.names.subscriptions_queue) == 0

    async def test_purge_all_command_empties_the_queue(self, broker, settings):
        """``dlq purge --all`` empties the DLQ and says how many it removed."""
        await broker.dead_letter_many(4)
        code, stdout, stderr = await run_cli_async(
            "dlq", "purge", "subscriptions", "--all", **cli_variables(settings)
        )
        assert code == 0, stderr
        assert stdout == f"purged 4 of 4 messages from {broker.dlq}\n"
        assert await broker.depth(broker.dlq) == 0

    @pytest.mark.parametrize(("answer", "left"), [("n", 2), ("y", 0)])
    async def test_purge_all_asks_first_on_a_terminal(self, broker, settings, answer, left):
        """On a terminal, ``purge --all`` asks before it deletes a whole queue for good; only
        "y" deletes (``--yes``, or no terminal, does not ask)."""
        await broker.dead_letter_many(2)
        code, shown = await asyncio.to_thread(on_a_terminal, settings, f"{answer}\n")
        assert "delete every message of subscriptions for good? [y/N]" in shown
        assert code == (0 if answer == "y" else 1)
        assert ("nothing purged" in shown) == (answer == "n")
        assert await broker.settled_depth(broker.dlq, left) == left

    async def test_purge_unknown_id_fails_and_removes_nothing(self, broker, settings):
        """An id the DLQ does not hold is named, the command exits 1, nothing is removed."""
        await broker.dead_letter("evt-a")
        code, stdout, stderr = await run_cli_async(
            "dlq", "purge", "subscriptions", "--id", "evt-b", **cli_variables(settings)
        )
        assert code == 1
        assert stdout == f"purged 0 of the 1 asked (1 in the queue) from {broker.dlq}\n"
        assert "not found: evt-b" in stderr
        assert await broker.settled_depth(broker.dlq, 1) == 1


class TestCommandErrors:
    @pytest.mark.parametrize(
        "command",
        [
            ["list"],
            ["show", "evt-a"],
            ["replay", "--all"],
            ["purge", "--all"],
        ],
        ids=lambda c: c[0],
    )
    async def test_a_queue_that_is_not_our_dlq_is_a_usage_error(self, settings, command):
        """Each dlq command refuses a queue that is not a dead-letter queue of this
        deployment (here: a work queue) with exit 2 and a message naming the right ones."""
        action, *rest = command
        work_queue = topology(settings).subscriptions_queue
        code, _, stderr = await run_cli_async(
            "dlq", action, work_queue, *rest, **cli_variables(settings)
        )
        assert code == 2
        assert f"'{work_queue}' is not a dead-letter queue of this deployment" in stderr
        assert "subscriptions, traces" in stderr

    async def test_a_dlq_not_declared_yet_fails_readably(self, settings):
        """A DLQ that does not exist on the broker yet ends the command with exit 1 and one
        line saying so, not a traceback."""
        code, _, stderr = await run_cli_async("dlq", "list", "traces", **cli_variables(settings))
        assert code == 1
        assert stderr.strip() == (
            f"edrone-bridge dlq: queue {settings.amqp_prefix}.traces.dlq does not exist on this "
            "broker (its consumer declares it at start)"
        )

    def test_selection_is_required(self):
        """replay and purge need --id or --all (exit 2 from argparse)."""
        result = run_cli("dlq", "purge", "subscriptions")
        assert result.returncode == 2
        assert "one of the arguments --id --all is required" in result.stderr
