"""Backfill and reconcile over a Magento-like table of their own.

Backfill: ``edrone-bridge backfill`` and ``edrone-bridge consume traces`` (its background lane,
set as the live one: 20 calls in flight, batches of 200), each in its own process, send every
row of the table to fake-edrone (its own process, 20 ms added latency) with the rate limit off:
rows/s from the backfill's start to the last trace, beside a bare aiohttp client POSTing forms
at the same concurrency.

Reconcile: ``edrone-bridge reconcile --json`` over tables of two sizes whose sync state holds
every address and 1% of whose rows were changed behind the trigger: rows/s and the peak RSS of
its process (from ``wait4``: the kernel's own high-water mark), beside a bare asyncpg cursor
reading the same table; the peak must stay flat as the table grows."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from benchmarks import deployment as d
from benchmarks.report import Row, Target, median
from benchmarks.traces import LATENCY_MS, bare_posts
from benchmarks.worker import Worker
from bridge.app_config import AppConfig, TargetMapping
from bridge.config import Settings

TABLE = "newsletter_subscriber"
TARGET = TargetMapping(
    table=TABLE,
    address_column="subscriber_email",
    email_status_column="subscriber_status",
    email_status_values={"subscribed": 1, "unsubscribed": 3},  # type: ignore[arg-type]
    set_now=("change_status_at",),
    changed_at_column="change_status_at",
)
# Magento's own table, filled in one statement: statuses alternate, dates a second apart.
_CREATE_SQL = f"""
CREATE TABLE {TABLE} (
    subscriber_id     serial PRIMARY KEY,
    store_id          smallint NOT NULL DEFAULT 0,
    subscriber_email  varchar(150),
    subscriber_status integer NOT NULL DEFAULT 0,
    change_status_at  timestamp
);
INSERT INTO {TABLE} (subscriber_email, subscriber_status, change_status_at)
SELECT 'c' || i || '@example.com', CASE WHEN i % 3 = 0 THEN 3 ELSE 1 END,
       timestamp '2024-01-01' + i * interval '1 second'
FROM generate_series(1, $1::int) AS i;
"""
# Every address known to the sync state as synced (both sides hold the shop's status).
_SYNCED_SQL = f"""
INSERT INTO sync_state (app_id, channel, address, seq, side, status, made_at, made_seq, event_id,
                        edrone_known, edrone_status, edrone_at, edrone_seq, edrone_second,
                        edrone_seen, shop_known, shop_status, shop_at, shop_seq)
SELECT $1, 'email', subscriber_email, 3, 'shop', s, at, 1, 'bench-' || subscriber_id,
       true, s, at, 2, date_trunc('second', at), CASE s WHEN 0 THEN 1 ELSE 2 END,
       true, s, at, 3
FROM (SELECT subscriber_id, subscriber_email,
             CASE subscriber_status WHEN 1 THEN 1 ELSE 0 END AS s,
             change_status_at AT TIME ZONE 'UTC' AS at
      FROM {TABLE}) AS rows
"""
# 1% changed behind the trigger (none is installed here): what reconcile is to find.
_DRIFT_SQL = f"""
UPDATE {TABLE} SET subscriber_status = CASE subscriber_status WHEN 1 THEN 3 ELSE 1 END,
                   change_status_at = timestamp '2025-06-01'
WHERE subscriber_id % 100 = 0
"""


_JOINED_SQL = f"""
SELECT t.subscriber_email, t.subscriber_status, s.status, s.shop_status, s.edrone_status
FROM {TABLE} AS t
FULL JOIN (SELECT * FROM sync_state WHERE app_id = $1 AND channel = 'email') AS s
  ON s.address = lower(btrim(t.subscriber_email))
"""


def _settings(name: str, **overrides: object) -> Settings:
    app = AppConfig(secret=d.SECRET, target=TARGET)
    return d.make_settings(name, apps={d.APP_ID: app}, **overrides)


def _config_file(settings: Settings, log_dir: Path) -> Path:
    """The app's target for the children, in the TOML file they read."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{settings.database_schema}.toml"
    values = TARGET.email_status_values
    path.write_text(
        f"[apps.{d.APP_ID}.target]\n"
        f'table = "{TARGET.table}"\n'
        f'address_column = "{TARGET.address_column}"\n'
        f'email_status_column = "{TARGET.email_status_column}"\n'
        f'set_now = ["change_status_at"]\n'
        f'changed_at_column = "change_status_at"\n'
        f"email_status_values = {{ subscribed = {values.subscribed}, "
        f"unsubscribed = {values.unsubscribed} }}\n",
        encoding="utf-8",
    )
    return path


async def _fill(settings: Settings, rows: int, *, synced: bool) -> None:
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        server_settings={"search_path": settings.database_schema},
        timeout=10,
    )
    try:
        await conn.execute(_CREATE_SQL.replace("$1::int", str(int(rows))))
        if synced:
            await conn.execute(_SYNCED_SQL, d.APP_ID)
            await conn.execute(_DRIFT_SQL)
        await conn.execute(f"ANALYZE {TABLE}")
    finally:
        await conn.close()


async def _traces_received(base_url: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/requests", params={"since": str(10**15)}) as response,
    ):
        return int((await response.json())["next"])


@dataclass
class Figures:
    backfill: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    reconcile: dict[int, list[float]] = field(default_factory=dict)
    reconcile_rss: dict[int, list[float]] = field(default_factory=dict)
    scan: dict[int, list[float]] = field(default_factory=dict)
    found: dict[int, list[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


async def run(*, repeats: int, rows: int, reconcile_rows: list[int], log_dir: Path) -> list[Row]:
    figures = Figures()
    for repeat in range(repeats):
        await _backfill(rows, repeat, log_dir, figures)
        for size in reconcile_rows:
            await _reconcile(size, log_dir, figures)
    return _rows(figures, rows, reconcile_rows)


async def _backfill(rows: int, repeat: int, log_dir: Path, figures: Figures) -> None:
    port = d.free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = _settings(
        "backfill",
        trace_url=f"{base_url}/trace",
        # The lane as the live one is set (its defaults, 10 calls of 50-row batches, are for
        # sharing edrone's 100/s): with no limit to share, what the pipeline can carry.
        traces={
            "rate_limit_per_s": 0,
            "background_concurrency": 20,
            "background_batch_size": 200,
        },
        metrics_port=d.free_port(),
    )
    env = d.environment(
        settings,
        EDRONE_BRIDGE_LOG_LEVEL="warning",
        EDRONE_BRIDGE_CONFIG=str(_config_file(settings, log_dir)),
    )
    fake = d.start_child(
        "fake-edrone",
        d.bridge_command(
            "fake-edrone",
            "--port",
            str(port),
            "--latency-ms",
            str(LATENCY_MS),
            "--max-records",
            "1000",
        ),
        env,
        log_dir,
    )
    try:
        await d.wait_http(f"{base_url}/healthz", fake)
        async with d.deployment(settings, traces=True):
            await _fill(settings, rows, synced=False)
            forwarder = d.start_child(
                f"backfill-traces-{repeat}", d.bridge_command("consume", "traces"), env, log_dir
            )
            try:
                await d.wait_http(f"http://127.0.0.1:{settings.metrics_port}/readyz", forwarder)
                started = time.perf_counter()
                command = d.start_child(
                    f"backfill-{repeat}",
                    d.bridge_command("backfill", "--app", d.APP_ID),
                    env,
                    log_dir,
                )
                sent = await _until_sent(base_url, rows, forwarder, timeout_s=rows / 50 + 60)
                elapsed = time.perf_counter() - started
                code = await asyncio.to_thread(command.process.wait, 60)
                if code != 0 or sent < rows:
                    figures.failures.append(f"backfill exit {code}, {sent:,} of {rows:,} sent")
                figures.backfill.append(sent / elapsed)
            finally:
                await d.stop_child(forwarder)
        # The background lane's own bound on calls in flight.
        concurrency = settings.traces.background_concurrency
        with Worker() as worker:
            figures.bare.append(
                await worker.run(bare_posts, settings.trace_url, min(rows, 50_000), concurrency)
            )
    finally:
        await d.stop_child(fake)


async def _until_sent(base_url: str, rows: int, forwarder: d.Child, *, timeout_s: float) -> int:
    deadline = time.perf_counter() + timeout_s
    sent = 0
    while time.perf_counter() < deadline:
        if forwarder.process.poll() is not None:
            raise RuntimeError(f"the forwarder exited:\n{forwarder.tail()}")
        sent = await _traces_received(base_url)
        if sent >= rows:
            break
        await asyncio.sleep(0.2)
    return sent


async def _reconcile(size: int, log_dir: Path, figures: Figures) -> None:
    settings = _settings("reconcile")
    env = d.environment(
        settings,
        EDRONE_BRIDGE_LOG_LEVEL="warning",
        EDRONE_BRIDGE_CONFIG=str(_config_file(settings, log_dir)),
    )
    async with d.deployment(settings, traces=True):
        await _fill(settings, size, synced=True)
        figures.scan.setdefault(size, []).append(await _bare_scan(settings))
        output = log_dir / f"reconcile-{size}.jsonl"
        started = time.perf_counter()
        code, peak_mb = await asyncio.to_thread(
            _measured, d.bridge_command("reconcile", "--app", d.APP_ID, "--json"), env, output
        )
        elapsed = time.perf_counter() - started
    figures.reconcile.setdefault(size, []).append(size / elapsed)
    figures.reconcile_rss.setdefault(size, []).append(peak_mb)
    listed = sum(1 for line in output.read_text(encoding="utf-8").splitlines() if '"kind"' in line)
    figures.found.setdefault(size, []).append(listed)
    # Exit 0 means no drift: 1% was planted, so the drift code is the expected one.
    if code == 0 or listed < size // 100:
        figures.failures.append(f"reconcile of {size:,}: exit {code}, {listed:,} listed")


def _measured(args: list[str], env: dict[str, str], output: Path) -> tuple[int, float]:
    """Run ``args`` to its end; (exit code, its peak RSS in MB, as the kernel counted it)."""
    with output.open("wb") as stdout:
        actions = [(os.POSIX_SPAWN_DUP2, stdout.fileno(), 1)]
        pid = os.posix_spawn(args[0], args, env, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


async def _bare_scan(settings: Settings) -> float:
    """asyncpg alone: a server-side cursor over every row of the table beside its address's
    sync state, the least any comparison of the two that looks at each row reads."""
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        server_settings={"search_path": settings.database_schema},
        timeout=10,
    )
    try:
        started = time.perf_counter()
        count = 0
        async with conn.transaction():
            cursor = await conn.cursor(_JOINED_SQL, d.APP_ID)
            while chunk := await cursor.fetch(5_000):
                count += len(chunk)
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


def _rows(figures: Figures, rows: int, sizes: list[int]) -> list[Row]:
    note = f"{rows:,} rows, fake-edrone with {LATENCY_MS} ms latency, rate limit off"
    if figures.failures:
        note += "; FAILED: " + "; ".join(figures.failures)
    found = [
        Row(
            "backfill: rows/s to edrone",
            "/s",
            figures.backfill,
            baseline="bare aiohttp POSTs",
            baseline_samples=figures.bare,
            target=Target("≥ 0.5 x bare client", min_ratio=0.5),
            note=note,
        )
    ]
    for size in sizes:
        found.append(
            Row(
                f"reconcile: rows/s at {size:,}",
                "/s",
                figures.reconcile.get(size, []),
                baseline="bare cursor: table beside state",
                baseline_samples=figures.scan.get(size, []),
                note=f"1% planted drift, {median(figures.found.get(size, [0])):,.0f} listed",
            )
        )
    smallest, largest = min(sizes), max(sizes)
    found.append(
        Row(
            f"reconcile: peak RSS at {largest:,}",
            "MB",
            figures.reconcile_rss.get(largest, []),
            baseline=f"peak RSS at {smallest:,}",
            baseline_samples=figures.reconcile_rss.get(smallest, []),
            target=Target("flat: ≤ 1.25 x the smaller table's", max_ratio=1.25),
            note="ru_maxrss of the reconcile process (wait4)",
        )
    )
    return found
