"""What the ingress tests post, how they read what it queued, and the networks that stand in
for edrone and its proxy."""

from __future__ import annotations

import json
from ipaddress import ip_network
from typing import Any
from urllib.parse import urlencode

import aio_pika

from bridge import bundles
from bridge.amqp import topology
from bridge.config import Settings

PATH = "/update_subscriber_status"
FORM = "application/x-www-form-urlencoded"
PROXY = ip_network("127.0.0.1/32")
EDRONE = ip_network("203.0.113.0/24")  # documentation ranges stand in for edrone and strangers


async def queued(settings: Settings, connection: aio_pika.abc.AbstractConnection) -> list[Any]:
    """Every message now in the subscription queue, taken off it."""
    channel = await connection.channel()
    queue = await channel.get_queue(topology(settings).subscriptions_queue)
    messages = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        messages.append(message)
    await channel.close()
    return messages


def webhooks_in(message: aio_pika.abc.AbstractIncomingMessage) -> list[bytes]:
    """The webhooks a message holds: a bundle's (bridge/bundles.py), or its own body."""
    if bundles.is_bundle(message.content_type):
        return bundles.split(message.body)
    return [message.body]


async def depth(settings: Settings, connection: aio_pika.abc.AbstractConnection) -> int:
    channel = await connection.channel()
    queue = await channel.declare_queue(topology(settings).subscriptions_queue, passive=True)
    await channel.close()
    assert queue.declaration_result.message_count is not None
    return queue.declaration_result.message_count


def json_body(fields: dict[str, Any]) -> dict[str, Any]:
    return {"data": json.dumps(fields), "headers": {"Content-Type": "application/json"}}


def form_body(fields: dict[str, Any]) -> dict[str, Any]:
    return {"data": urlencode(fields), "headers": {"Content-Type": FORM}}
