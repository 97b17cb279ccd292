"""``consume traces --lane``: the forwarder's two lanes in processes of their own. Each consumes
only its queue, the background one at a lower CPU priority; together they keep the app's one
rate limit (tests/consumers/test_backfill_at_scale.py runs them side by side at scale)."""

from __future__ import annotations

import asyncio
import os

import pytest

from bridge.amqp import topology
from consumers import traces
from consumers.service import consumers_of
from tests.support.cli import run_cli
from tests.support.processes import BridgeProcess, bridge_env, free_port, wait_ready


@pytest.mark.parametrize(
    ("lane", "queues"),
    [("both", ["traces", "backfill"]), ("live", ["traces"]), ("background", ["backfill"])],
)
async def test_each_lane_consumes_only_its_queue(lane, queues, make_traces, amqp_connection, pool):
    settings = await make_traces(lane=lane)
    names = topology(settings)
    expected = [{"traces": names.traces_queue, "backfill": names.backfill_queue}[q] for q in queues]
    async with consumers_of(traces.PART, settings, amqp_connection, pool) as consumers:
        assert [consumer.queue_name for consumer in consumers] == expected


async def test_the_background_process_lowers_its_cpu_priority(make_traces, db, tmp_path):
    """The background lane's process takes traces.background_nice (10) for itself, so that
    the machine's CPU goes to the live lane first; it serves as any consumer."""
    settings = await make_traces()
    port = free_port()
    process = BridgeProcess(
        tmp_path / "background.log",
        *("consume", "traces", "--lane", "background"),
        env=bridge_env(settings, EDRONE_BRIDGE_METRICS_PORT=str(port)),
    )
    try:
        await process.start()
        await wait_ready(f"http://127.0.0.1:{port}")
        assert process.process is not None
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, process.process.pid) == min(19, mine + 10)
        assert await process.terminate(30) == 0, process.log_tail()
    finally:
        await process.kill()


def test_an_unknown_lane_is_a_usage_error():
    result = run_cli("consume", "traces", "--lane", "sideways")
    assert result.returncode == 2
    assert "invalid choice: 'sideways'" in result.stderr


async def test_an_unknown_lane_setting_is_refused(make_settings):
    with pytest.raises(ValueError, match="lane"):
        await asyncio.to_thread(make_settings, traces={"lane": "sideways"})
