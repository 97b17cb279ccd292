"""A local stand-in of edrone's trace API (``POST /trace``) for tests, demos and staging: it
answers like edrone, records every request, and injects faults switchable at run time."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from http.client import responses
from typing import Any, Self
from urllib.parse import parse_qsl

import structlog
from aiohttp import web
from yarl import URL

log = structlog.get_logger(__name__)

TRACE_PATH = "/trace"
FORM = "application/x-www-form-urlencoded"
EVENT_ID_HEADER = "x-edrone-event-id"
# Checked in this order, so the error names the first one missing (docs/protocol.md §2).
REQUIRED_FIELDS = ("app_id", "email", "action_type")
RECORDED_HEADERS = ("content-type", "content-length", "user-agent")
DEFAULT_MAX_RECORDS = 100_000


def _valid(value: Any, low: int, high: int, *, integer: bool = True, null: bool = False) -> bool:
    if value is None:
        return null
    # JSON true/false are ints to Python, and a fault setting of `true` is a mistake, not 1;
    # NaN and infinities fail the range check.
    kinds = int if integer else (int, float)
    return not isinstance(value, bool) and isinstance(value, kinds) and low <= value <= high


@dataclass
class Faults:
    """What goes wrong, read afresh for every trace request: ``status`` (when set) answers every
    trace; else ``failure_status`` with probability ``failure_rate``. ``latency_ms`` delays each
    answer; ``retry_after`` and ``body`` shape the injected failures."""

    failure_rate: float = 0.0
    failure_status: int = 500
    status: int | None = None
    latency_ms: float = 0
    retry_after: int | None = None
    body: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "failure_rate: a number from 0 to 1": _valid(self.failure_rate, 0, 1, integer=False),
            "failure_status: an integer, 400-599": _valid(self.failure_status, 400, 599),
            "status: null or an integer, 200-599": _valid(self.status, 200, 599, null=True),
            "latency_ms: a number, 0-600000": _valid(self.latency_ms, 0, 600_000, integer=False),
            "retry_after: null or an integer >= 0": _valid(self.retry_after, 0, 2**31, null=True),
            "body: null or a string": self.body is None or isinstance(self.body, str),
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ValueError("invalid faults: " + "; ".join(problems))

    @classmethod
    def from_json(cls, data: Any) -> Faults:
        """A whole new setting: keys left out take their defaults; unknown keys are refused
        (a misspelt key would otherwise silently inject nothing)."""
        if not isinstance(data, dict):
            raise ValueError("invalid faults: expected a JSON object")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"invalid faults: unknown keys {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request to ``/trace`` as received, with the answer it got. ``index`` counts from 0
    over the fake's life and is never reused, so ``?since=`` survives drops and clears."""

    index: int
    received_at: str  # wall clock, ISO 8601 UTC
    received_monotonic: float  # for per-second rate windows: immune to clock steps
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: str  # raw, so tests can see how each value was encoded
    form: dict[str, str]  # last value wins for a repeated field, as PHP's $_POST does
    form_multi: tuple[tuple[str, str], ...]  # every pair, in order
    status: int
    event_id: str | None
    fault: str | None  # "status" or "failure_rate" when the answer was injected

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["form_multi"] = [list(pair) for pair in self.form_multi]
        return data


@dataclass
class FakeState:
    """What changes while the fake runs (app state itself is frozen once it starts)."""

    faults: Faults
    rng: random.Random
    records: deque[RecordedRequest]
    next_index: int = 0
    dropped: int = 0

    def record(self, request: RecordedRequest) -> None:
        if len(self.records) == self.records.maxlen:
            if self.dropped == 0:
                log.warning("fake_edrone_dropping_records", max_records=self.records.maxlen)
            self.dropped += 1
        self.records.append(request)
        self.next_index = request.index + 1

    def clear(self) -> int:
        cleared = len(self.records)
        self.records.clear()
        self.dropped = 0
        return cleared


STATE = web.AppKey("fake_edrone_state", FakeState)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _accepted(status: int = 200) -> web.Response:
    event_id = str(uuid.uuid4())
    return web.json_response(
        {"status": "ok", "event_id": event_id}, status=status, headers={EVENT_ID_HEADER: event_id}
    )


def _injected(status: int, faults: Faults) -> web.Response:
    if 200 <= status < 300:
        return _accepted(status)
    headers = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
    if faults.body is not None:
        return web.Response(status=status, text=faults.body, headers=headers)
    reason = responses.get(status, "Error")
    return _error(status, f"{reason} (injected by fake-edrone)", headers)


def _missing_field(form: dict[str, str]) -> str | None:
    # edrone requires the e-mail for `subscribe` (and an absent action_type may be one); other
    # actions may trace an anonymous visitor.
    email_needed = (form.get("action_type") or "subscribe") == "subscribe"
    for name in REQUIRED_FIELDS:
        if not form.get(name) and (name != "email" or email_needed):
            return name
    return None


def _answer(
    request: web.Request, form: dict[str, str], state: FakeState
) -> tuple[web.Response, str | None]:
    """The response edrone would give, or the injected one; with the fault's name if any."""
    faults = state.faults
    if faults.status is not None:
        return _injected(faults.status, faults), "status"
    if state.rng.random() < faults.failure_rate:
        return _injected(faults.failure_status, faults), "failure_rate"
    if request.method != "POST":
        return _error(405, f"Method not allowed: {request.method}", {"Allow": "POST"}), None
    if request.content_type != FORM:
        return _error(415, f"Unsupported content type: {request.content_type}; use {FORM}"), None
    missing = _missing_field(form)
    if missing is not None:
        return _error(400, f"Missing required field: {missing}"), None
    return _accepted(), None


async def trace(request: web.Request) -> web.Response:
    state = request.app[STATE]
    received_at, received_monotonic = datetime.now(UTC).isoformat(), time.monotonic()
    # A body that is not UTF-8 was never encoded as edrone expects; U+FFFD marks where.
    body = (await request.read()).decode("utf-8", errors="replace")
    pairs = parse_qsl(body, keep_blank_values=True) if request.content_type == FORM else []
    form = dict(pairs)
    response, fault = _answer(request, form, state)
    headers = {name: request.headers[name] for name in RECORDED_HEADERS if name in request.headers}
    record = RecordedRequest(
        index=state.next_index,
        received_at=received_at,
        received_monotonic=received_monotonic,
        method=request.method,
        path=request.path,
        query_string=request.query_string,
        headers=headers,
        body=body,
        form=form,
        form_multi=tuple(pairs),
        status=response.status,
        event_id=response.headers.get(EVENT_ID_HEADER),
        fault=fault,
    )
    # Recorded before the added latency, so a caller that times out still finds its attempt.
    state.record(record)
    # The form carries e-mail addresses: identifiers only, and only at debug.
    log.debug("trace_answered", status=response.status, fault=fault, app_id=form.get("app_id"))
    if state.faults.latency_ms > 0:
        await asyncio.sleep(state.faults.latency_ms / 1000)
    return response


async def list_requests(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        return _error(400, "since: expected an integer index")
    records = [r.to_json() for r in state.records if r.index >= since]
    return web.json_response(
        {"requests": records, "next": state.next_index, "dropped": state.dropped}
    )


async def clear_requests(request: web.Request) -> web.Response:
    cleared = request.app[STATE].clear()
    log.info("fake_edrone_requests_cleared", cleared=cleared)
    return web.json_response({"cleared": cleared, "next": request.app[STATE].next_index})


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].faults.to_json())


async def put_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        new = Faults.from_json(await request.json())
    except json.JSONDecodeError as exc:
        return _error(400, f"invalid faults: not JSON ({exc})")
    except ValueError as exc:
        return _error(400, str(exc))
    # Changed in place, so a `fake.faults` reference held in Python stays the live setting.
    for name, value in new.to_json().items():
        setattr(state.faults, name, value)
    log.info("fake_edrone_faults_changed", **state.faults.to_json())
    return web.json_response(state.faults.to_json())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_fake_edrone(
    *,
    faults: Faults | None = None,
    seed: int | None = None,
    max_records: int = DEFAULT_MAX_RECORDS,
) -> web.Application:
    """The fake's app; ``seed`` makes the ``failure_rate`` draws reproducible, and only the
    newest ``max_records`` requests are kept (the older ones are counted as dropped)."""
    if max_records < 1:
        raise ValueError("max_records must be at least 1")
    app = web.Application()
    app[STATE] = FakeState(
        faults=faults if faults is not None else Faults(),
        rng=random.Random(seed),
        records=deque(maxlen=max_records),
    )
    app.add_routes(
        [
            web.route("*", TRACE_PATH, trace),
            web.get("/requests", list_requests),
            web.delete("/requests", clear_requests),
            web.get("/faults", get_faults),
            web.put("/faults", put_faults),
            web.get("/healthz", healthz),
        ]
    )
    return app


class FakeEdrone:
    """The fake on a real socket: ``async with FakeEdrone() as fake: post to fake.url``."""

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        seed: int | None = None,
        max_records: int = DEFAULT_MAX_RECORDS,
        shutdown_timeout_s: float = 1.0,
    ) -> None:
        self.app = create_fake_edrone(faults=faults, seed=seed, max_records=max_records)
        # Short: a request held by injected latency must not hold up a test's teardown.
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host`` (one literal address) and ``port`` (0: any free); the bound port."""
        if self._runner is not None:
            raise RuntimeError("fake-edrone is already started")
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._shutdown_timeout_s)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self.host, self.port = runner, host, runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return str(URL.build(scheme="http", host=self.host, port=self.port))

    @property
    def url(self) -> str:
        """The trace endpoint, edrone's ``https://api.edrone.me/trace`` stand-in."""
        return self.base_url + TRACE_PATH

    @property
    def state(self) -> FakeState:
        return self.app[STATE]

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self.state.faults = faults

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self.state.records)

    @property
    def dropped(self) -> int:
        return self.state.dropped

    def clear(self) -> int:
        return self.state.clear()


async def serve(
    host: str,
    port: int,
    stopping: asyncio.Event,
    faults: Faults | None = None,
    *,
    seed: int | None = None,
    max_records: int = DEFAULT_MAX_RECORDS,
) -> None:
    """Serve the fake until ``stopping`` is set (the ``fake-edrone`` command)."""
    fake = FakeEdrone(faults=faults, seed=seed, max_records=max_records)
    bound = await fake.start(host, port)
    try:
        log.info("fake_edrone_listening", url=fake.url, port=bound, **fake.faults.to_json())
        await stopping.wait()
        log.info("fake_edrone_stopping", received=fake.state.next_index)
    finally:
        await fake.stop()
