"""The bridge on a real three-node RabbitMQ cluster of the test's own (tests/support/
rabbit_cluster.py): the ingress (two workers), two subscription consumers and the trace
forwarder spread over the nodes, every quorum queue with three replicas. While webhooks and
shop events flow, the node leading the queues is killed (``kill -9`` of its VM) and later
restarted, then a second node is stopped cleanly. Counted: every 200 applied exactly once,
every 503 lands once resent, every shop event traced, nothing dead-lettered, and the 503s
only within the failover windows, which are measured.

Its size: ``EDRONE_BRIDGE_TEST_CLUSTER_WEBHOOKS`` (5,000) webhooks and a fifth as many shop
events, sent over about ``EDRONE_BRIDGE_TEST_CLUSTER_SEND_S`` (40) seconds."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence

import aio_pika
import pytest

from bridge.amqp import declare_topology, declare_trace_topology, topology
from bridge.broker import connect
from bridge.cli.status import render
from bridge.config import Settings
from bridge.ops.queue_status import Management, management_for
from bridge.ops.status import Status, check_status
from tests.support.consumers import TRACE_FAST, platform_message, shop_event, wait_until
from tests.support.lanes import FakeEdroneProcess
from tests.support.processes import (
    FAST_SUBSCRIPTIONS,
    Answers,
    BridgeProcess,
    bridge_env,
    check_ledger,
    free_port,
    history,
    report,
    send,
    wait_for_count,
    wait_ready,
)
from tests.support.rabbit_cluster import Cluster, Node, rabbit_cluster

WEBHOOKS = int(os.environ.get("EDRONE_BRIDGE_TEST_CLUSTER_WEBHOOKS", "5000"))
SHOP_EVENTS = max(1, WEBHOOKS // 5)
SEND_S = float(os.environ.get("EDRONE_BRIDGE_TEST_CLUSTER_SEND_S", "40"))
# The longest a node's loss may make the ingress answer 503: its connections see the loss at
# once (the socket closes) and reconnect to the next node within amqp_reconnect_interval_s;
# the quorum queues elect a new leader within a second, and a publisher nacked meanwhile moves
# to a new channel within RENEW_INTERVAL_S (measured, median of three: 0.3 s after a kill,
# none after a stop, 0.5 s at most; 9 to 11 s after a kill before publishers moved).
FAILOVER_BOUND_S = 5.0


def rotated(urls: Sequence[str], start: int) -> str:
    """The cluster's URLs starting at node ``start``: where a process given them connects."""
    return ",".join([*urls[start:], *urls[:start]])


async def publish_with_retries(
    settings: Settings, events: Sequence[dict[str, object]], per_s: float
) -> int:
    """Publish the shop's events through the cluster, as a shop's publisher that survives a
    node's loss does: each one confirmed, resent after a failure; the number of resends."""
    resends = 0
    connection = await connect(settings, "test shop publisher")
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.platform_exchange)
        started = time.monotonic()
        for n, event in enumerate(events):
            await asyncio.sleep(max(0.0, started + n / per_s - time.monotonic()))
            message = platform_message(event, with_id=True)
            while True:
                try:
                    await exchange.publish(message, settings.platform_routing_key, timeout=5)
                    break
                except Exception:  # any failure of a publish: send it again
                    resends += 1
                    await asyncio.sleep(0.5)
    finally:
        await asyncio.wait_for(connection.close(), 10)
    return resends


async def wait_for_replicas(settings: Settings, api: Management) -> Status:
    """status, once the API has every queue's replicas (a node's stop takes a moment to show)."""
    deadline = time.monotonic() + 60
    while True:
        shown = await check_status(settings, management=api)
        if all(queue.members is not None and queue.offline for queue in shown.queues):
            return shown
        if time.monotonic() > deadline:
            seen = [(q.name, q.leader, q.members, q.online) for q in shown.queues]
            raise AssertionError(f"replicas not shown: {seen}; broker: {shown.broker}")
        await asyncio.sleep(1)


def check_replicas_shown(
    shown: Status, table: str, nodes: Sequence[str], stopped: Sequence[str]
) -> None:
    """Every queue on the three nodes, the stopped one offline, led by a running one; the
    table's REPLICAS and LEADER say so, and a note names the node offline."""
    assert len(stopped) == 1
    for queue in shown.queues:
        assert sorted(queue.members or ()) == sorted(nodes), queue
        assert queue.offline == stopped and queue.leader not in stopped, queue
        [line] = [line for line in table.splitlines() if line.startswith(queue.name + " ")]
        assert line.split("<<")[0].split()[-2:] == ["2/3", queue.leader], line
    assert any(f"1 of 3 replicas offline ({stopped[0]})" in note for note in shown.notes)


async def dead_letters(node: Node, settings: Settings) -> dict[str, int]:
    names = topology(settings)
    connection = await aio_pika.connect(node.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        dead = {}
        for queue in names.work_queues():
            dlq = names.dead_letter_queue(queue)
            declared = await channel.declare_queue(dlq, passive=True)
            dead[dlq] = int(declared.declaration_result.message_count or 0)
    return dead


async def leader_of(cluster: Cluster, asking: Node, queue: str) -> Node:
    leaders = await cluster.leaders(asking, [queue])
    return cluster.node(leaders[queue])


@pytest.mark.timeout(600)
async def test_a_cluster_loses_a_leader_and_a_node_and_nothing_is_lost(
    make_settings: Callable[..., Settings], settings: Settings, db, tmp_path, capsys
):
    changes = history(WEBHOOKS, addresses=WEBHOOKS // 10, seed=14, tag="cluster")
    events = [
        shop_event(f"cluster-shop-{n}@example.com", status=n % 2, event_id=f"cluster-shop-{n}")
        for n in range(SHOP_EVENTS)
    ]
    async with (
        rabbit_cluster(3) as cluster,
        FakeEdroneProcess(tmp_path / "fake.log", max_records=SHOP_EVENTS * 3) as fake,
    ):
        a, b, c = cluster.nodes
        urls = cluster.amqp_urls
        clustered = make_settings(
            amqp_url=rotated(urls, 0),
            amqp_node_order="given",
            amqp_connect_attempts=5,
            publish_timeout_s=2.0,
            subscriptions=FAST_SUBSCRIPTIONS,
            traces=TRACE_FAST,
            trace_url=fake.url,
        )
        names = topology(clustered)
        # Declared through node a, so that a leads every queue: the node the test kills.
        seed = await aio_pika.connect(a.amqp_url, timeout=10)
        async with seed:
            channel = await seed.channel()
            await declare_topology(channel, clustered)
            await declare_trace_topology(channel, clustered)
        leaders = await cluster.leaders(b, [names.subscriptions_queue, names.traces_queue])
        members = await cluster.cli(
            "rabbitmqctl", b, "list_queues", "-q", "--no-table-headers", "name", "members"
        )

        port = free_port()
        base = f"http://127.0.0.1:{port}"

        def process(name: str, start: int, *args: str, **variables: str) -> BridgeProcess:
            env = bridge_env(
                clustered,
                EDRONE_BRIDGE_AMQP_URL=rotated(urls, start),
                EDRONE_BRIDGE_AMQP_NODE_ORDER="given",
                EDRONE_BRIDGE_AMQP_RECONNECT_INTERVAL_S="0.5",
                EDRONE_BRIDGE_AMQP_CONNECT_ATTEMPTS="5",
                EDRONE_BRIDGE_PUBLISH_TIMEOUT_S="2",
                EDRONE_BRIDGE_TRACE_URL=fake.url,
                EDRONE_BRIDGE_METRICS_PORT=str(free_port()),
                **variables,
            )
            return BridgeProcess(tmp_path / f"{name}.log", *args, env=env)

        processes = [
            # The ingress on a, the node to be killed: its 503s measure the failover.
            process(
                "ingress",
                0,
                "ingress",
                EDRONE_BRIDGE_HTTP_PORT=str(port),
                EDRONE_BRIDGE_INGRESS_WORKERS="2",
            ),
            process("subscriptions-1", 1, "consume", "subscriptions"),
            process("subscriptions-2", 2, "consume", "subscriptions"),
            process("traces", 1, "consume", "traces"),
        ]
        first = Answers()
        moments: dict[str, float] = {}
        try:
            for bridge_process in processes:
                await bridge_process.start()
            await wait_ready(base, 60)

            async def chaos() -> None:
                await wait_until(lambda: first.done >= 0.15 * len(changes), 120)
                killed = await leader_of(cluster, b, names.subscriptions_queue)
                moments["kill"] = await cluster.kill(killed)
                await wait_until(lambda: first.done >= 0.35 * len(changes), 120)
                moments["restart"] = time.monotonic()
                await cluster.start(killed)
                moments["restarted"] = time.monotonic()
                # The second loss: whichever node leads the subscription queue now.
                asking = killed
                second = await leader_of(cluster, asking, names.subscriptions_queue)
                moments["stop"] = time.monotonic()
                await cluster.stop(second)
                moments["stopped"] = time.monotonic()

            async with asyncio.timeout(300):
                _, resends, _ = await asyncio.gather(
                    send(
                        base + clustered.webhook_path,
                        changes,
                        first,
                        concurrency=20,
                        backoff_s=0.2,
                        per_s=WEBHOOKS / SEND_S,
                    ),
                    publish_with_retries(clustered, events, SHOP_EVENTS / SEND_S),
                    chaos(),
                )
            counts = first.counts()
            await wait_ready(base, 60)
            resent = Answers()
            for _ in range(5):
                answers = {**first.by_event, **resent.by_event}
                pending = [change for change in changes if answers[change.event_id] != "200"]
                if not pending:
                    break
                await send(base + clustered.webhook_path, pending, resent, concurrency=20)
            stored = await wait_for_count(db, "SELECT count(*) FROM inbox", len(changes), 120)
            ledger = await check_ledger(db, changes)
            await fake.wait_for(SHOP_EVENTS, 120)
            sent_emails = [request.form["email"] for request in await fake.requests()]
            survivors = [node for node in cluster.nodes if node.running]
            dead = await dead_letters(survivors[0], clustered)
            # What status shows of the cluster with one node down: from the API of any node.
            api = management_for(survivors[0].amqp_url, survivors[0].management_url)
            shown = await wait_for_replicas(clustered, api)
            table = render(shown)
            stopped = [node.name for node in cluster.nodes if not node.running]
        finally:
            for bridge_process in processes:
                await bridge_process.terminate(30)

    failures = first.failed_at
    kill_window = [t - moments["kill"] for t in failures if t < moments["stop"]]
    stop_window = [t - moments["stop"] for t in failures if t >= moments["stop"]]
    report(
        capsys,
        "cluster of 3: leader killed and restarted, a second node stopped",
        webhooks=len(changes),
        ok_200=counts["200"],
        not_200=len(changes) - counts["200"],
        answers=dict(counts),
        resent=resent.done,
        stored=stored,
        shop_events=len(events),
        shop_resends=resends,
        traced=len(set(sent_emails)),
        dead_lettered=sum(dead.values()),
        leaders_at_start=sorted(set(leaders.values())),
        failover_after_kill_s=round(max(kill_window, default=0.0), 2),
        failover_after_stop_s=round(max(stop_window, default=0.0), 2),
        restart_took_s=round(moments["restarted"] - moments["restart"], 1),
        stop_took_s=round(moments["stopped"] - moments["stop"], 1),
    )
    check_replicas_shown(shown, table, [node.name for node in cluster.nodes], stopped)
    # Three replicas of every queue, all led by a at the start.
    assert set(leaders.values()) == {a.name}, leaders
    for line in members.splitlines():
        if line.startswith(names.prefix):
            assert all(node.name in line for node in (a, b, c)), line
    assert set(counts) <= {"200", "503"}, counts
    assert first.events("200") | resent.events("200") == {change.event_id for change in changes}
    assert stored == len(changes)
    assert ledger.ok, (ledger.missing[:5], ledger.unexpected[:5], ledger.wrong[:5])
    assert set(sent_emails) == {str(event["email"]) for event in events}
    assert dead == dict.fromkeys(dead, 0), dead
    # No 503 before the first loss, and none later than the bound after a loss.
    assert all(0 <= s <= FAILOVER_BOUND_S for s in kill_window), kill_window[-5:]
    assert all(s <= FAILOVER_BOUND_S for s in stop_window), stop_window[-5:]
