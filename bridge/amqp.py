"""RabbitMQ plumbing: topology names and their idempotent declaration (bridge/broker.py
connects)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from bridge.config import Settings
from bridge.part_settings import TraceSettings
from bridge.service_urls import amqp_urls

log = structlog.get_logger(__name__)

# Routing keys of the webhook exchange: one per channel, so a deployment may split the two.
ROUTING_KEY_BY_CHANNEL = {"email": "subscription.email", "sms": "subscription.sms"}


@dataclass(frozen=True)
class Topology:
    """Every exchange and queue name of one deployment, derived from its prefix."""

    prefix: str

    @property
    def webhook_exchange(self) -> str:
        return f"{self.prefix}.webhooks"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dead-letter"

    @property
    def retry_exchange(self) -> str:
        return f"{self.prefix}.retry"

    @property
    def subscriptions_queue(self) -> str:
        return f"{self.prefix}.subscriptions"

    @property
    def traces_queue(self) -> str:
        return f"{self.prefix}.traces"

    @property
    def backfill_queue(self) -> str:
        """The trace forwarder's background lane: rows of ``backfill`` and ``reconcile``,
        sent with what the live lane leaves of each app's rate budget."""
        return f"{self.prefix}.traces.backfill"

    @property
    def trace_lanes(self) -> list[str]:
        return [self.traces_queue, self.backfill_queue]

    def work_queues(self) -> list[str]:
        return [self.subscriptions_queue, *self.trace_lanes]

    def dead_letter_queue(self, work_queue: str) -> str:
        return f"{work_queue}.dlq"

    def retry_queue(self, work_queue: str, delay_s: float) -> str:
        # The delay is in the name: changing the tiers declares new queues instead of
        # clashing with the arguments of the old ones.
        return f"{work_queue}.retry.{round(delay_s * 1000)}ms"

    def parked_queues(self, work_queue: str, tiers_s: Sequence[float]) -> list[str]:
        """Where ``work_queue``'s messages are parked: its dead-letter queue, then its tiers."""
        tiers = [self.retry_queue(work_queue, delay_s) for delay_s in tiers_s]
        return [self.dead_letter_queue(work_queue), *tiers]

    def retry_queues(self, tiers_s: Sequence[float], work_queue: str | None = None) -> list[str]:
        """The retry tiers of ``work_queue`` (the live trace lane unless named)."""
        work = work_queue or self.traces_queue
        return [self.retry_queue(work, delay_s) for delay_s in tiers_s]

    def queues(self, retry_tiers_s: Sequence[float] = ()) -> list[str]:
        """Every queue of the deployment: work queues, their dead-letter queues, retry tiers
        (both trace lanes have them)."""
        work = self.work_queues()
        dead = [self.dead_letter_queue(q) for q in work]
        tiers = [t for lane in self.trace_lanes for t in self.retry_queues(retry_tiers_s, lane)]
        return work + dead + tiers

    def exchanges(self) -> list[str]:
        return [self.webhook_exchange, self.dead_letter_exchange, self.retry_exchange]


def topology(settings: Settings) -> Topology:
    return Topology(settings.amqp_prefix)


QueueKind = Literal["work", "dlq", "retry"]


@dataclass(frozen=True)
class QueueSpec:
    """One queue of the deployment: what it is for, the work queue it serves, and the numbers
    it is declared with, so that the tools read them from here instead of deriving them anew."""

    name: str
    kind: QueueKind
    work_queue: str
    # A work queue's x-delivery-limit (None: none, as on dead-letter and retry-tier queues).
    delivery_limit: int | None = None
    # A retry tier's own delay, and how long its message has waited by design since its first
    # failure: this tier and every shorter one.
    delay_s: float | None = None
    scheduled_s: float = 0.0


def queue_specs(settings: Settings) -> list[QueueSpec]:
    """Every queue of the deployment, in ``Topology.queues()`` order."""
    names = topology(settings)
    limits = {
        names.subscriptions_queue: settings.subscriptions.delivery_limit,
        names.traces_queue: settings.traces.delivery_limit,
        names.backfill_queue: settings.traces.delivery_limit,
    }
    work = names.work_queues()
    specs = [QueueSpec(q, "work", q, delivery_limit=limits[q]) for q in work]
    specs += [QueueSpec(names.dead_letter_queue(q), "dlq", q) for q in work]
    tiers = settings.traces.retry_tiers_s
    specs += [
        QueueSpec(
            names.retry_queue(lane, delay_s),
            "retry",
            lane,
            delay_s=delay_s,
            scheduled_s=sum(tiers[: i + 1]),
        )
        for lane in names.trace_lanes
        for i, delay_s in enumerate(tiers)
    ]
    return specs


def delivery_limits(settings: Settings) -> dict[str, int]:
    """Each work queue's x-delivery-limit, to count the attempts of a broker-dead-lettered
    message (declaration fails unless the queue's argument matches these settings)."""
    return {
        spec.name: spec.delivery_limit
        for spec in queue_specs(settings)
        if spec.delivery_limit is not None
    }


_WORD = re.compile(r"[A-Za-z0-9_-]+")


def platform_routing_keys(settings: Settings) -> list[str]:
    """What the trace queue takes from the shop's platform exchange: the shared key, and one
    key per configured app (``customer.subscription.changed.<app_id>``). On a broker that
    several deployments share, a shop publishes with its app's key, so that each deployment
    receives only its own apps' events and dead-letters none of the others'."""
    base = settings.platform_routing_key
    # Only an app id that is one plain word: "." splits words, "*" and "#" are wildcards.
    own = [app_id for app_id in sorted(settings.apps) if _WORD.fullmatch(app_id)]
    return [base, *(f"{base}.{app_id}" for app_id in own)]


def quorum_group_size(settings: Settings) -> int | None:
    """How many replicas each quorum queue is declared with (None: the broker's default):
    the setting, else, given several broker URLs, their number up to 3, or 5 from five on (an
    odd count: a majority of 3 survives one node down, of 5 two)."""
    if settings.amqp_quorum_group_size is not None:
        return settings.amqp_quorum_group_size
    nodes = len(amqp_urls(settings.amqp_url.get_secret_value()))
    if nodes == 1:
        return None
    return 5 if nodes >= 5 else min(nodes, 3)


def _quorum(group_size: int | None) -> dict[str, Any]:
    if group_size is None:
        return {"x-queue-type": "quorum"}
    return {"x-queue-type": "quorum", "x-quorum-initial-group-size": group_size}


def quorum_arguments(
    *,
    dead_letter_exchange: str,
    dead_letter_routing_key: str,
    delivery_limit: int | None,
    group_size: int | None = None,
) -> dict[str, Any]:
    """A quorum queue that dead-letters at least once (not at most once, the default)."""
    arguments: dict[str, Any] = {
        **_quorum(group_size),
        "x-dead-letter-exchange": dead_letter_exchange,
        "x-dead-letter-routing-key": dead_letter_routing_key,
        # at-least-once dead-lettering requires reject-publish overflow.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    return arguments


async def declare_dead_letter_queue(
    channel: AbstractChannel, names: Topology, work_queue: str, group_size: int | None = None
) -> None:
    dlx = await channel.declare_exchange(
        names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dlq_name = names.dead_letter_queue(work_queue)
    dlq = await channel.declare_queue(dlq_name, durable=True, arguments=_quorum(group_size))
    await dlq.bind(dlx, routing_key=dlq_name)


async def declare_webhook_exchange(channel: AbstractChannel, names: Topology) -> AbstractExchange:
    return await channel.declare_exchange(
        names.webhook_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )


async def declare_topology(channel: AbstractChannel, settings: Settings) -> AbstractExchange:
    """Declare the webhook exchange (returned), the subscription work queue and its dead-letter
    queue.

    Idempotent: every process runs it at start; the arguments must never change silently, so
    RabbitMQ refusing a redeclaration with other arguments stops the start."""
    names = topology(settings)
    group_size = quorum_group_size(settings)
    exchange = await declare_webhook_exchange(channel, names)
    await declare_dead_letter_queue(channel, names, names.subscriptions_queue, group_size)
    queue = await channel.declare_queue(
        names.subscriptions_queue,
        durable=True,
        arguments=quorum_arguments(
            dead_letter_exchange=names.dead_letter_exchange,
            dead_letter_routing_key=names.dead_letter_queue(names.subscriptions_queue),
            delivery_limit=settings.subscriptions.delivery_limit,
            group_size=group_size,
        ),
    )
    for routing_key in ROUTING_KEY_BY_CHANNEL.values():
        await queue.bind(exchange, routing_key=routing_key)
    log.info("topology_declared", prefix=settings.amqp_prefix)
    return exchange


async def declare_trace_topology(channel: AbstractChannel, settings: Settings) -> None:
    """Declare the trace forwarder's side: its two lanes (the live one bound to the shop's
    platform exchange, the background one fed by ``backfill`` and ``reconcile``), each a
    quorum work queue with its dead-letter queue and one retry-tier queue per delay whose
    queue-level TTL dead-letters each message back to its lane through the default exchange."""
    names = topology(settings)
    platform = await channel.declare_exchange(
        settings.platform_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    retry = await channel.declare_exchange(
        names.retry_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    group_size = quorum_group_size(settings)
    for lane in names.trace_lanes:
        queue = await _declare_lane(channel, names, settings.traces, lane, retry, group_size)
        if lane == names.traces_queue:
            for routing_key in platform_routing_keys(settings):
                await queue.bind(platform, routing_key=routing_key)
    log.info(
        "trace_topology_declared",
        prefix=settings.amqp_prefix,
        tiers=settings.traces.retry_tiers_s,
    )


async def _declare_lane(
    channel: AbstractChannel,
    names: Topology,
    options: TraceSettings,
    work: str,
    retry: AbstractExchange,
    group_size: int | None,
) -> AbstractQueue:
    await declare_dead_letter_queue(channel, names, work, group_size)
    queue = await channel.declare_queue(
        work,
        durable=True,
        arguments=quorum_arguments(
            dead_letter_exchange=names.dead_letter_exchange,
            dead_letter_routing_key=names.dead_letter_queue(work),
            delivery_limit=options.delivery_limit,
            group_size=group_size,
        ),
    )
    for delay_s in options.retry_tiers_s:
        tier_name = names.retry_queue(work, delay_s)
        tier = await channel.declare_queue(
            tier_name,
            durable=True,
            arguments={
                **quorum_arguments(
                    dead_letter_exchange="",
                    dead_letter_routing_key=work,
                    delivery_limit=None,
                    group_size=group_size,
                ),
                "x-message-ttl": round(delay_s * 1000),
            },
        )
        await tier.bind(retry, routing_key=tier_name)
    return queue
