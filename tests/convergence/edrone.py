"""A simulated edrone that behaves like edrone (docs/protocol.md §5): a status per address; a
signed webhook to the bridge's ingress for every change of it, those a trace of the bridge's
made included (TRACE reasons, edrone's own processing date); random delays, so webhooks come
reordered, some twice; dates written to the second or to the millisecond; its own people
changing statuses. A real HTTP server on a local port serves ``POST /trace``."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web

from bridge.signing import sign

TRACE_REASON = {1: 10, 0: 6, None: 13}  # TRACE_SUBSCRIBED, TRACE_UNSUBSCRIBED, TRACE_UNKNOWN
PERSON_REASON = {1: 11, 0: 1, None: 14}  # AGENT_SUBSCRIBED, CUSTOMER_UNSUBSCRIBED, ...


@dataclass
class EdroneAccount:
    """One app at edrone: its secret, and a status per e-mail address."""

    app_id: str
    secret: str
    status: dict[str, int | None] = field(default_factory=dict)


class SimulatedEdrone:
    """``accounts`` by app id; webhooks go to ``ingress_url``."""

    def __init__(
        self,
        accounts: dict[str, EdroneAccount],
        ingress_url: str,
        rng: random.Random,
        *,
        max_delay_s: float = 3.0,
        duplicate_rate: float = 0.05,
    ) -> None:
        self.accounts = accounts
        self.ingress_url = ingress_url
        self.rng = rng
        self.max_delay_s = max_delay_s
        self.duplicate_rate = duplicate_rate
        self.url = ""
        self.counts: Counter[str] = Counter()
        self.log: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.last_activity = time.monotonic()
        self._pending: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sending = asyncio.Semaphore(64)

    async def __aenter__(self) -> SimulatedEdrone:
        app = web.Application()
        app.add_routes([web.post("/trace", self._trace)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/trace"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in list(self._pending):
            task.cancel()
        for task in list(self._pending):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- edrone's own people -----------------------------------------------------------------

    def person_sets(self, app_id: str, email: str, status: int) -> tuple[datetime, bool] | None:
        """A person at edrone sets ``status``: when (edrone's date) and whether that date is
        written to the second; None when it was the status already (no change, no webhook)."""
        account = self.accounts[app_id]
        if account.status.get(email, 1) == status:
            return None
        # edrone writes dates to the millisecond at best: the oracle compares at that resolution.
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond - now.microsecond % 1000)
        account.status[email] = status
        whole = self._post_webhook(app_id, email, status, PERSON_REASON[status], now)
        self.counts["person_changes"] += 1
        self._note(app_id, email, f"person sets {status} (webhook dated {_fmt(now, whole)})")
        return now, whole

    # --- the trace API -----------------------------------------------------------------------

    async def _trace(self, request: web.Request) -> web.Response:
        form = dict(parse_qsl(await request.text(), keep_blank_values=True))
        self.last_activity = time.monotonic()
        self.counts["traces"] += 1
        app_id, email = form.get("app_id", ""), form.get("email", "")
        account = self.accounts.get(app_id)
        if account is None or not email:
            return web.json_response({"error": "Missing required field: app_id"}, status=400)
        if "subscriber_status" in form:
            raw = form["subscriber_status"]
            status = None if raw == "" else int(raw)
            processed = datetime.now(UTC)
            if account.status.get(email, 1) != status:
                account.status[email] = status
                whole = self._post_webhook(app_id, email, status, TRACE_REASON[status], processed)
                self.counts["effective_traces"] += 1
                self._note(
                    app_id, email, f"trace sets {status} (webhook dated {_fmt(processed, whole)})"
                )
            else:
                self._note(app_id, email, f"trace of {status}: no change")
        return web.json_response({}, headers={"x-edrone-event-id": str(uuid.uuid4())})

    # --- webhooks ------------------------------------------------------------------------------

    def _post_webhook(
        self, app_id: str, email: str, status: int | None, reason: int, when: datetime
    ) -> bool:
        whole = self.rng.random() < 0.5
        date = _fmt(when, whole)
        fields = {
            "subscription_status_type_id": "1",
            "email": email,
            "subscriber_status": "" if status is None else str(status),
            "subscription_status_reason": str(reason),
            "event_date": date,
            "event_id": f"edrone-{uuid.uuid4()}",
            "app_id": app_id,
        }
        fields["signature"] = sign("NATIVE_5", fields, self.accounts[app_id].secret, app_id)
        copies = 2 if self.rng.random() < self.duplicate_rate else 1
        for _ in range(copies):
            delay = self.rng.uniform(0, self.max_delay_s)
            task = asyncio.create_task(self._deliver(fields, delay))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        self.counts["webhooks"] += 1
        return whole

    async def _deliver(self, fields: dict[str, str], delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        assert self._session is not None
        body = urlencode(fields)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        for attempt in range(30):  # edrone retries a webhook that was not taken
            try:
                async with (
                    self._sending,
                    self._session.post(self.ingress_url, data=body, headers=headers) as response,
                ):
                    await response.read()
                    if response.status == 200:
                        self.counts["webhooks_delivered"] += 1
                        self.last_activity = time.monotonic()
                        return
                    self.counts[f"webhook_answer_{response.status}"] += 1
            except (aiohttp.ClientError, TimeoutError):
                self.counts["webhook_errors"] += 1
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        self.counts["webhooks_lost"] += 1

    def _note(self, app_id: str, email: str, line: str) -> None:
        self.log[(app_id, email)].append(
            f"{datetime.now(UTC).isoformat(timespec='milliseconds')} edrone: {line}"
        )


def _fmt(when: datetime, whole: bool) -> str:
    if whole:
        return when.strftime("%Y-%m-%d %H:%M:%S")
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
