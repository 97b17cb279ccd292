"""Connecting to RabbitMQ: one node, or any node of a cluster (``EDRONE_BRIDGE_AMQP_URL`` as a
comma-separated list). The first connect is retried a bounded number of times; after that,
aio-pika's robust connection reconnects, and each attempt of ours and of its goes to the next
node, so a node that is down is left for the next one instead of being retried for ever."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from bridge.config import Settings
from bridge.service_urls import amqp_urls
from bridge.starting import ServiceUnreachable, unless_stopped

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection whose every connect attempt takes the next of ``urls`` in turn,
    starting with the first; each node it gets is logged (``amqp_connected``)."""

    def __init__(self, urls: Sequence[URL], name: str, **kwargs: Any) -> None:
        self._urls = list(urls)
        self._turn = -1  # the first attempt takes urls[0]
        self._name = name
        super().__init__(self._urls[0], **kwargs)
        self._rotating = True
        self.reconnect_callbacks.add(self._log_node)

    # aio-pika clears its transport just before each connect attempt, first and reconnects,
    # in every version this project admits (and on close): the one moment at which to point
    # that attempt at the next node. Its reconnect loop otherwise retries one URL for ever.
    @property  # type: ignore[override]
    def transport(self) -> Any:
        return self.__dict__.get("_transport")

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and self.__dict__.get("_rotating") and len(self._urls) > 1:
            self._turn += 1
            self.url = self._urls[self._turn % len(self._urls)]
        self.__dict__["_transport"] = value

    @property
    def node(self) -> str:
        """``host:port`` of the node this connection is on, or is trying."""
        return node_address(self.url)

    def _log_node(self, *_: object) -> None:
        log.info("amqp_connected", connection=self._name, node=self.node, reconnected=True)


def node_address(url: URL | str) -> str:
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port or (5671 if parsed.scheme == 'amqps' else 5672)}"


def broker_address(url: str) -> str:
    """``host:port[,host:port…] vhost V`` of the broker URLs, for messages (no user, no
    password)."""
    urls = amqp_urls(url)
    vhost = URL(urls[0]).path[1:] or "/"
    return f"{','.join(node_address(u) for u in urls)} vhost {vhost}"


def node_order(urls: Sequence[str], chooser: random.Random | None = None) -> list[URL]:
    """The nodes in the order this process tries them: shuffled once, so that the replicas of
    a part spread over a cluster's nodes instead of all taking the first."""
    order = [URL(url) for url in urls]
    (chooser or random.Random()).shuffle(order)
    return order


async def connect(
    settings: Settings, name: str, *, stopping: asyncio.Event | None = None
) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection. The first connect is retried a bounded number
    of times, each attempt on the next node and logged, unless the broker refused the login (a
    wrong password never fixes itself) or ``stopping`` is set (:class:`Stopped`); then
    :class:`ServiceUnreachable` names the broker, its variable and its address."""
    url = settings.amqp_url.get_secret_value()
    urls = amqp_urls(url)
    nodes = node_order(urls) if settings.amqp_node_order == "shuffled" else [URL(u) for u in urls]
    attempts = settings.amqp_connect_attempts
    for attempt in range(1, attempts + 1):
        # Each attempt starts on the next node; the connection goes on from there.
        start = (attempt - 1) % len(nodes)
        try:
            return await _first_connect(settings, nodes[start:] + nodes[:start], name, stopping)
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            refused = isinstance(exc, aiormq.exceptions.ProbableAuthenticationError)
            log.warning(
                "amqp_connect_failed",
                attempt=attempt,
                of=attempts,
                node=node_address(nodes[start]),
                error=repr(exc),
            )
            if refused or attempt == attempts:
                why = "the broker refused the login" if refused else _reason(exc)
                raise ServiceUnreachable(
                    f"cannot connect to RabbitMQ at {broker_address(url)} "
                    f"(EDRONE_BRIDGE_AMQP_URL): {why}"
                ) from exc
        await unless_stopped(asyncio.sleep(settings.amqp_connect_delay_s), stopping)
    raise AssertionError("unreachable")


async def _first_connect(
    settings: Settings, nodes: Sequence[URL], name: str, stopping: asyncio.Event | None
) -> AbstractRobustConnection:
    # aio-pika's connect_robust, with the connection kept in hand: a first connect given up
    # (stopped, failed) must close it, or its reconnect task keeps the process alive.
    # Options as keywords, over the first URL's query: aio-pika 10.0 reads the query only when
    # given no keyword at all (and so ignored reconnect_interval in the URL here).
    connection = ClusterConnection(
        nodes,
        name,
        **{
            **dict(nodes[0].query),
            "reconnect_interval": settings.amqp_reconnect_interval_s,
            "client_properties": {"connection_name": f"edrone-bridge {name}"},
        },
    )
    try:
        await unless_stopped(connection.connect(timeout=CONNECT_TIMEOUT_S), stopping)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), 5)
        raise
    log.info("amqp_connected", connection=name, node=connection.node, reconnected=False)
    return connection


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__
