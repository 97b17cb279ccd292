"""The settings of each part of the bridge (``EDRONE_BRIDGE_SUBSCRIPTIONS__*``,
``EDRONE_BRIDGE_TRACES__*``, ``EDRONE_BRIDGE_SYNC__*``, ``EDRONE_BRIDGE_RELAY__*``), grouped
in the one settings object of bridge/config.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ConsumerOptions(BaseModel):
    """Every number of the consumer runtime (``consumers.runtime.Consumer``), with its one
    default: batching, prefetch, retries, draining, the watchdog, the failure limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(default=500, ge=1, le=10_000)
    flush_interval_ms: int = Field(default=20, ge=1, le=60_000)
    # Unacked messages the broker may push ahead; more than one batch so that the next batch
    # fills while the previous one is handled.
    prefetch: int = Field(default=2_000, ge=1, le=65_535)
    # Broker-side poison-message guard: after this many deliveries the quorum queue
    # dead-letters the message by itself.
    delivery_limit: int = Field(default=20, ge=1)
    retry_initial_backoff_s: float = Field(default=0.5, gt=0)
    retry_max_backoff_s: float = Field(default=30.0, gt=0)
    # On stop: how long buffered batches may still finish and ack before the channel closes
    # and hands the rest back to the broker; keep it below the container's grace period.
    drain_timeout_s: float = Field(default=10.0, gt=0)
    # How often the consumer checks that the broker still delivers to it; a consumer found
    # lost at two checks in a row is registered again on fresh channels.
    watchdog_interval_s: float = Field(default=5.0, gt=0)
    # A message in this many failed batches is dead-lettered whatever the cause (docs/design.md
    # promise 7); only failures while the database answered count, so an outage does not.
    max_batch_failures: int = Field(default=10, ge=1, le=1_000)


class SubscriptionConsumerSettings(ConsumerOptions):
    """The batch applier of edrone's status changes."""

    db_batch_timeout_s: float = Field(default=30.0, gt=0)


class TraceSettings(ConsumerOptions):
    """The forwarder of the shop's changes to edrone's trace API."""

    # Each batch pays two database round trips, an ack and its last round's idle slots (about
    # 20 ms): at 100 that was a fifth of a batch of 20 ms calls (benchmarks/), at 200 a tenth.
    batch_size: int = Field(default=200, ge=1, le=10_000)
    prefetch: int = Field(default=400, ge=1, le=65_535)
    # Requests in flight to edrone at once, over every app.
    concurrency: int = Field(default=20, ge=1, le=1_000)
    # edrone's documented limit for server-side senders; 0 turns the limit off.
    rate_limit_per_s: float = Field(default=100.0, ge=0)
    # The background lane (backfill, reconcile: topology's backfill_queue) uses only what live
    # traffic leaves of each app's limit (consumers/throttle.py): live demand's recent peak
    # times the headroom stays free for it, and never less than the fraction of the limit.
    background_concurrency: int = Field(default=10, ge=1, le=1_000)
    # Smaller batches than live ones: both lanes share the event loop and the pool, and a
    # batch of 200 rows planned at once held live changes up by a p95 of 130 ms, 50 by 40 ms.
    background_batch_size: int = Field(default=50, ge=1, le=10_000)
    background_reserve_fraction: float = Field(default=0.1, ge=0, lt=1)
    background_headroom: float = Field(default=1.5, ge=1)
    # A background batch waits this long for room at most; its calls still waiting are
    # retried through the first tier (not counted), so busy live traffic cannot time it out.
    background_max_wait_s: float = Field(default=30.0, gt=0)
    # Which lanes `consume traces` consumes. Apart ("live" in one process, "background" in
    # another), a backfill takes none of live's CPU: in one process it added tens of ms to
    # live's latency on 2 cores. The rate limits are shared either way (consumers/rate_budget.py).
    lane: Literal["both", "live", "background"] = "both"
    # The niceness a process consuming only the background lane gives itself, so that the
    # machine's CPU goes to live traffic first.
    background_nice: int = Field(default=10, ge=0, le=19)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=15.0, gt=0)
    # Delay of each retry tier, in order; after the last one a message is dead-lettered.
    retry_tiers_s: tuple[float, ...] = (10.0, 60.0, 300.0, 1800.0, 7200.0)
    # Consecutive failed requests after which the forwarder stops sending for a while.
    breaker_failures: int = Field(default=10, ge=1)
    breaker_initial_pause_s: float = Field(default=1.0, gt=0)
    breaker_max_pause_s: float = Field(default=60.0, gt=0)
    db_timeout_s: float = Field(default=30.0, gt=0)
    # Sent as the trace's platform and platform_version (the shop's software, say "magento");
    # `version` is always the bridge's own.
    platform: str = "edrone-bridge"
    platform_version: str = ""

    @field_validator("retry_tiers_s")
    @classmethod
    def _tiers_ascend(cls, tiers: tuple[float, ...]) -> tuple[float, ...]:
        if not tiers or any(t <= 0 for t in tiers) or list(tiers) != sorted(set(tiers)):
            raise ValueError("retry tiers must be positive, distinct and ascending")
        return tiers


class SyncSettings(BaseModel):
    """How the two directions are kept converging (docs/design.md promise 6)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A trace edrone never acknowledged with a webhook (it changed nothing there) and a write
    # the shop never echoed are forgotten after this long.
    ack_window_s: float = Field(default=3600.0, gt=0)
    # How long after the bridge publishes a change on the shop's bus the shop has applied it:
    # a write older than that when a person changes the shop is no longer awaited as an echo
    # (for shops that do not set caused_by).
    echo_latency_s: float = Field(default=5.0, gt=0)
    # An echo follows its write; a shop change made before the write was published is a
    # person's. Raise this when the shop's clock may lag the bridge's (shops without caused_by).
    echo_clock_tolerance_s: float = Field(default=0.0, ge=0)
    # How often each consumer process looks for messages to publish after a commit (edrone's
    # changes for the shop's bus, requests to bring edrone to the winner) that another process
    # left behind; its own are published at once.
    dispatch_poll_interval_s: float = Field(default=1.0, gt=0)
    dispatch_batch_size: int = Field(default=500, ge=1, le=10_000)


class RelaySettings(BaseModel):
    """``edrone-bridge relay``: the shop's changes recorded by the outbox trigger, published."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Outbox rows read, coalesced per customer and published per transaction.
    batch_size: int = Field(default=500, ge=1, le=10_000)
    # The relay wakes on the trigger's NOTIFY; this poll is the fallback (a lost LISTEN
    # connection, another relay holding the turn) and the pause after a failed batch.
    poll_interval_s: float = Field(default=5.0, gt=0)
    # Batches failing this many times in a row while the database answers are taken apart
    # row by row, and the row that fails alone is set aside with its error.
    max_batch_failures: int = Field(default=10, ge=1, le=1_000)
