"""Group commit for webhooks: while the broker confirms what was sent, the webhooks that arrive
meanwhile wait and go together, as one bundle (bridge/bundles.py) with one confirm for all."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge import bundles
from bridge.publishing import ConfirmedPublisher, PublishFailed


@dataclass(eq=False)
class _Bundle:
    routing_key: str
    created_at: float
    bodies: list[bytes] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    # One future per caller, not one shielded future for all: a caller that gives up cancels
    # only its own, and a confirm wakes each caller in one step.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Bundler:
    """Publishes webhooks through ``publisher``, at most ``in_flight`` broker messages at once.

    A webhook that finds a free slot goes at once, alone, as the message it always was (so at
    a low rate nothing changes and nothing waits). When every slot waits for its confirm, the
    webhooks that arrive meanwhile are gathered per routing key, up to ``max_webhooks`` in one
    bundle, and the first slot to free up sends the oldest. A webhook's :meth:`publish` returns
    only once the broker confirmed the message that holds it (docs/design.md promise 1), and
    raises :class:`PublishFailed` for all of a bundle's webhooks when it is not confirmed.

    A bundle still unsent ``timeout_s`` after its first webhook came is failed unsent (the
    broker is not keeping up; each webhook gets its 503), so no wait is longer than twice the
    publish timeout."""

    def __init__(
        self,
        publisher: ConfirmedPublisher,
        *,
        max_webhooks: int,
        in_flight: int,
        timeout_s: float,
        on_confirmed: Callable[[int], None] | None = None,
    ) -> None:
        self.publisher = publisher
        # Told the number of webhooks in each message the broker confirmed.
        self._on_confirmed = on_confirmed
        self._max_webhooks = max_webhooks
        self._slots = in_flight
        self._timeout_s = timeout_s
        self._filling: dict[str, _Bundle] = {}
        self._full: deque[_Bundle] = deque()
        # Every webhook not yet answered, by event_id: edrone's retry of one waits for it.
        self._pending: dict[str, _Bundle] = {}
        self._sending = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        return self.publisher.ready

    async def publish(self, body: bytes, *, routing_key: str, event_id: str) -> None:
        """Return once the broker confirmed ``body``; :class:`PublishFailed` otherwise."""
        bundle = self._pending.get(event_id)
        if bundle is None:
            bundle = self._add(body, routing_key, event_id)
        waiter = asyncio.get_running_loop().create_future()
        bundle.waiters.append(waiter)
        await waiter

    def _add(self, body: bytes, routing_key: str, event_id: str) -> _Bundle:
        bundle = self._filling.get(routing_key)
        if bundle is None:
            bundle = _Bundle(routing_key, asyncio.get_running_loop().time())
            self._filling[routing_key] = bundle
        bundle.bodies.append(body)
        bundle.event_ids.append(event_id)
        self._pending[event_id] = bundle
        if len(bundle.bodies) >= self._max_webhooks:
            del self._filling[routing_key]
            self._full.append(bundle)
        if not self._scheduled:
            # At the end of this turn of the loop: what arrived in the same turn goes together.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_next)
        return bundle

    def _next(self) -> _Bundle | None:
        if self._full:
            return self._full.popleft()
        if self._filling:
            routing_key = next(iter(self._filling))  # the oldest
            return self._filling.pop(routing_key)
        return None

    def _send_next(self) -> None:
        self._scheduled = False
        now = asyncio.get_running_loop().time()
        while self._sending < self._slots and (bundle := self._next()) is not None:
            if now - bundle.created_at > self._timeout_s:
                waited = f"not sent within {self._timeout_s:g}s: the broker is not keeping up"
                self._settle(bundle, PublishFailed(waited))
                continue
            self._sending += 1
            task = asyncio.create_task(self._send(bundle))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, bundle: _Bundle) -> None:
        failure: BaseException | None = None
        try:
            if len(bundle.bodies) == 1:
                await self.publisher.publish(
                    bundle.bodies[0], routing_key=bundle.routing_key, message_id=bundle.event_ids[0]
                )
            else:
                await self.publisher.publish(
                    bundles.join(bundle.bodies),
                    routing_key=bundle.routing_key,
                    # Unique: aiormq tells the returns of two messages apart by it.
                    message_id=f"bundle-{uuid.uuid4().hex}",
                    headers={bundles.HEADER_BUNDLED: len(bundle.bodies)},
                    content_type=bundles.BUNDLE_CONTENT_TYPE,
                )
        except BaseException as exc:  # cancelled at shutdown too: its webhooks get a 503
            failure = exc if isinstance(exc, PublishFailed) else PublishFailed(repr(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._sending -= 1
            if failure is None and self._on_confirmed is not None:
                self._on_confirmed(len(bundle.bodies))
            self._settle(bundle, failure)
            if self._filling or self._full:
                self._send_next()

    def _settle(self, bundle: _Bundle, failure: BaseException | None) -> None:
        for event_id in bundle.event_ids:
            if self._pending.get(event_id) is bundle:
                del self._pending[event_id]
        for waiter in bundle.waiters:
            if waiter.done():  # its caller gave up
                continue
            if failure is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(failure)
