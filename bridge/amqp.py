"""RabbitMQ plumbing: topology names, a connection with bounded retries, idempotent declaration."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from bridge.config import Settings

log = structlog.get_logger(__name__)

# Routing keys of the webhook exchange: one per channel, so a deployment may split the two.
ROUTING_KEY_BY_CHANNEL = {"email": "subscription.email", "sms": "subscription.sms"}

# Headers the runtime sets on a message it dead-letters (DESIGN.md promise 4).
HEADER_ERROR = "x-error"
HEADER_ATTEMPTS = "x-attempts"
HEADER_FIRST_FAILURE = "x-first-failure-at"
HEADER_DEAD_LETTERED_AT = "x-dead-lettered-at"
HEADER_ORIGINAL_QUEUE = "x-original-queue"


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
    def subscriptions_queue(self) -> str:
        return f"{self.prefix}.subscriptions"

    def dead_letter_queue(self, work_queue: str) -> str:
        return f"{work_queue}.dlq"

    def queues(self) -> list[str]:
        """Every queue of the deployment, work queues first."""
        work = [self.subscriptions_queue]
        return work + [self.dead_letter_queue(q) for q in work]

    def exchanges(self) -> list[str]:
        return [self.webhook_exchange, self.dead_letter_exchange]


def topology(settings: Settings) -> Topology:
    return Topology(settings.amqp_prefix)


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection; the first connect is retried a bounded number
    of times, each attempt logged, then the last error is raised."""
    url = settings.amqp_url.get_secret_value()
    attempts = settings.amqp_connect_attempts
    for attempt in range(1, attempts + 1):
        try:
            return await aio_pika.connect_robust(
                url,
                timeout=10,
                reconnect_interval=settings.amqp_reconnect_interval_s,
                client_properties={"connection_name": f"edrone-bridge {name}"},
            )
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            log.warning("amqp_connect_failed", attempt=attempt, of=attempts, error=repr(exc))
            if attempt == attempts:
                raise
            await asyncio.sleep(settings.amqp_connect_delay_s)
    raise AssertionError("unreachable")


def quorum_arguments(
    *, dead_letter_exchange: str, dead_letter_routing_key: str, delivery_limit: int | None
) -> dict[str, Any]:
    """A quorum queue that dead-letters at least once (not at most once, the default)."""
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
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
    channel: AbstractChannel, names: Topology, work_queue: str
) -> None:
    dlx = await channel.declare_exchange(
        names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dlq_name = names.dead_letter_queue(work_queue)
    dlq = await channel.declare_queue(dlq_name, durable=True, arguments={"x-queue-type": "quorum"})
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
    exchange = await declare_webhook_exchange(channel, names)
    await declare_dead_letter_queue(channel, names, names.subscriptions_queue)
    queue = await channel.declare_queue(
        names.subscriptions_queue,
        durable=True,
        arguments=quorum_arguments(
            dead_letter_exchange=names.dead_letter_exchange,
            dead_letter_routing_key=names.dead_letter_queue(names.subscriptions_queue),
            delivery_limit=settings.subscriptions.delivery_limit,
        ),
    )
    for routing_key in ROUTING_KEY_BY_CHANNEL.values():
        await queue.bind(exchange, routing_key=routing_key)
    log.info("topology_declared", prefix=settings.amqp_prefix)
    return exchange
