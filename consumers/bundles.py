"""A bundle's webhooks as deliveries of their own (bridge/bundles.py): the handlers, the poison
isolation, the dead-letter and retry copies and ``dlq`` all see each webhook alone, as if it had
come in a message of its own; only the ack is the bundle's, once all of its parts are done."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from types import TracebackType

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractProcessContext

from bridge import bundles
from bridge.headers import HEADER_DELIVERY_COUNT

# A message's event_id, read without parsing the rest: in JSON text the bytes `"event_id":"`
# can only be that key (a quote inside a string value is escaped).
_EVENT_ID = re.compile(rb'"event_id":("(?:[^"\\]|\\.)*")')


class Part(aio_pika.Message, AbstractIncomingMessage):
    """One webhook of ``bundle``: its own body and message id (its event_id), every other
    property the bundle's. The channel and the delivery tag are the bundle's too: acking a part
    acks the whole bundle, so the runtime acks a batch only once every part of its bundles
    has its outcome (:func:`whole` keeps a bundle in one batch)."""

    def __init__(self, bundle: AbstractIncomingMessage, body: bytes) -> None:
        found = _EVENT_ID.search(body)
        event_id: str | None = None
        if found is not None:
            try:
                event_id = json.loads(found.group(1))
            except ValueError:  # not JSON: the handler rejects the part for it
                event_id = None
        headers = {k: v for k, v in (bundle.headers or {}).items() if k != bundles.HEADER_BUNDLED}
        super().__init__(
            body,
            headers=headers,
            content_type="application/json",
            content_encoding=bundle.content_encoding,
            delivery_mode=bundle.delivery_mode,
            priority=bundle.priority,
            correlation_id=bundle.correlation_id,
            reply_to=bundle.reply_to,
            expiration=bundle.expiration,
            message_id=event_id,
            timestamp=bundle.timestamp,
            type=bundle.type,
            user_id=bundle.user_id,
            app_id=bundle.app_id,
        )
        self.bundle = bundle
        self.cluster_id = bundle.cluster_id
        self.consumer_tag = bundle.consumer_tag
        self.delivery_tag = bundle.delivery_tag
        self.redelivered = bundle.redelivered
        self.message_count = bundle.message_count
        self.routing_key = bundle.routing_key
        self.exchange = bundle.exchange

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        return self.bundle.channel

    @property
    def processed(self) -> bool:
        return self.bundle.processed

    def process(
        self,
        requeue: bool = False,
        reject_on_redelivered: bool = False,
        ignore_processed: bool = False,
    ) -> AbstractProcessContext:
        """The bundle's: it acks or rejects the whole bundle."""
        return self.bundle.process(requeue, reject_on_redelivered, ignore_processed)

    async def ack(self, multiple: bool = False) -> None:
        await self.bundle.ack(multiple)

    async def reject(self, requeue: bool = False) -> None:
        await self.bundle.reject(requeue)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        await self.bundle.nack(multiple, requeue)

    async def __aenter__(self) -> Part:
        await self.bundle.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.bundle.__aexit__(exc_type, exc_val, exc_tb)


def unbundle(delivery: AbstractIncomingMessage) -> list[AbstractIncomingMessage]:
    """The deliveries ``delivery`` stands for: its parts if it is a bundle, else itself (a
    bundle with no line is handed on as it is: its handler rejects it as no message)."""
    if not bundles.is_bundle(delivery.content_type):
        return [delivery]
    parts = bundles.split(delivery.body)
    if not parts:
        return [delivery]
    return [Part(delivery, body) for body in parts]


def part_of_redelivered(delivery: AbstractIncomingMessage) -> bool:
    """A part of a bundle the broker delivers again: it goes back to its queue alone, so that
    from then on the delivery limit counts its deliveries, not its bundle's."""
    return isinstance(delivery, Part) and bool(delivery.redelivered)


def alone_headers(part: AbstractIncomingMessage) -> dict[str, object]:
    """A part's headers for its copy of its own: the broker's count was the bundle's."""
    return {k: v for k, v in (part.headers or {}).items() if k != HEADER_DELIVERY_COUNT}


def whole(deliveries: Sequence[AbstractIncomingMessage], size: int) -> int:
    """How many of ``deliveries`` to take for a batch of ``size``: more, if the cut would
    leave part of a bundle behind (its ack would ack the parts left behind with it)."""
    end = min(size, len(deliveries))
    while end < len(deliveries) and _same_bundle(deliveries[end - 1], deliveries[end]):
        end += 1
    return end


def _same_bundle(a: AbstractIncomingMessage, b: AbstractIncomingMessage) -> bool:
    return isinstance(a, Part) and isinstance(b, Part) and a.bundle is b.bundle
