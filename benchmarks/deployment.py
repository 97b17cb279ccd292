"""One throwaway deployment per benchmark: a unique AMQP prefix and PostgreSQL schema (as the
tests make them), the bridge's own commands as child processes, and everything removed after."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from bridge.amqp import declare_topology, declare_trace_topology, topology
from bridge.app_config import AppConfig
from bridge.config import Settings
from bridge.migrate import migrate

APP_ID = "bench-app"
SECRET = "bench-secret"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Services:
    amqp_url: str
    database_url: str


def services() -> Services:
    return Services(
        amqp_url=os.environ.get(
            "EDRONE_BRIDGE_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"
        ),
        database_url=os.environ.get(
            "EDRONE_BRIDGE_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(name: str, **overrides: Any) -> Settings:
    """Settings of a deployment of its own (prefix and schema ``bench_<name>_<random>``)."""
    found = services()
    suffix = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "amqp_url": found.amqp_url,
        "database_url": found.database_url,
        "amqp_prefix": suffix,
        "platform_exchange": f"{suffix}.platform",
        "database_schema": suffix,
        "apps": {APP_ID: AppConfig(secret=SECRET)},
        "http_host": "127.0.0.1",
        "amqp_connect_attempts": 3,
        "amqp_connect_delay_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a child ``edrone-bridge`` command these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDRONE_BRIDGE_")}
    data = settings.model_dump(mode="json", exclude={"apps"})
    for key, value in data.items():
        name = f"EDRONE_BRIDGE_{key.upper()}"
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                env[f"{name}__{sub.upper()}"] = _env_value(sub_value)
        elif value is not None:
            env[name] = _env_value(value)
    env["EDRONE_BRIDGE_AMQP_URL"] = settings.amqp_url.get_secret_value()
    env["EDRONE_BRIDGE_DATABASE_URL"] = settings.database_url.get_secret_value()
    env["EDRONE_BRIDGE_APPS"] = ",".join(
        f"{app_id}:{app.secret.get_secret_value()}" for app_id, app in settings.apps.items()
    )
    env["EDRONE_BRIDGE_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def _env_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


@asynccontextmanager
async def deployment(
    settings: Settings,
    *,
    traces: bool = False,
    database: bool = True,
    extra_queues: tuple[str, ...] = (),
) -> AsyncIterator[Settings]:
    """Declare the topology and migrate the schema; remove both on exit, whatever happened."""
    try:
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
        async with connection:
            channel = await connection.channel()
            async with channel:
                await declare_topology(channel, settings)
                if traces:
                    await declare_trace_topology(channel, settings)
        if database:
            conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
            try:
                await migrate(conn, settings.database_schema)
            finally:
                await conn.close()
        yield settings
    finally:
        await remove(settings, extra_queues=extra_queues)


async def remove(settings: Settings, extra_queues: tuple[str, ...] = ()) -> None:
    names = topology(settings)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        queues = [*names.queues(settings.traces.retry_tiers_s), *extra_queues]
        for queue in queues:
            # Quorum queues refuse if_unused=True (and the channel would be closed).
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
        for exchange in [*names.exchanges(), settings.platform_exchange]:
            await channel.exchange_delete(exchange, if_unused=False)
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
    finally:
        await conn.close()


async def queue_depth(settings: Settings, queue: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def purge(settings: Settings, *queues: str) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=10)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            queue = await channel.get_queue(name, ensure=True)
            await queue.purge(timeout=30)


# --- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    """A bridge command (or any command) in a child process, with its stderr kept to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    rss: list[tuple[float, float]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """This process and its children (the ingress's extra workers)."""
        return [self.pid, *children_of(self.pid)]

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_child(name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        args, env=dict(env), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
    )
    log_file.close()
    return Child(name, process, log_path)


def bridge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge", *args]


def bare_command(port: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.bare", str(port)]


async def stop_child(child: Child, timeout_s: float = 15.0) -> int | None:
    if child.process.poll() is None:
        child.process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(child.process.wait, timeout_s)
    except subprocess.TimeoutExpired:
        child.process.kill()
        return await asyncio.to_thread(child.process.wait, 5)


async def wait_http(url: str, child: Child | None = None, timeout_s: float = 30.0) -> None:
    """Wait until ``url`` answers 200 (the child's readyz, say); fail early if it died."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if child is not None and child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited early:\n{child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s}s")


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as file:
            return [int(p) for p in file.read().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of ``pid`` in MB, from /proc; (nan, nan) once it is gone."""
    values = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


class RssSampler:
    """Samples the RSS of every watched process (and its children) every ``interval_s``."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.peaks: dict[str, float] = {}
        self._watched: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, name: str, pid: int) -> None:
        self._watched[name] = pid

    def watch_child(self, child: Child) -> None:
        pids = child.pids()
        if len(pids) == 1:
            self.watch(child.name, pids[0])
        for index, pid in enumerate(pids if len(pids) > 1 else []):
            self.watch(f"{child.name}[{index}]", pid)

    def sample(self) -> None:
        now = time.monotonic()
        for name, pid in self._watched.items():
            current, peak = rss_mb(pid)
            if current == current:
                self.samples.setdefault(name, []).append((now, current))
                self.peaks[name] = max(self.peaks.get(name, 0.0), peak)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()


# --- CPU accounting --------------------------------------------------------------------------


def cpu_s(pids: list[int]) -> float:
    """User plus system CPU seconds used so far by ``pids`` (those still alive)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (every core, every process)."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pids_named(*names: str) -> list[int]:
    """Processes whose command name is one of ``names`` (the broker's beam.smp, postgres)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text(encoding="ascii").strip() in names:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class CpuMeter:
    """CPU used by named groups of processes, and by the whole machine, over a measured span:
    what shows which process had the cores and which limit a figure ran into."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self._wall = 0.0
        # The span of the last start-stop, seconds: cores x wall_s is CPU seconds.
        self.wall_s = 0.0

    def start(self) -> None:
        self._wall = time.monotonic()
        self._start = {name: cpu_s(pids) for name, pids in self.groups.items()}
        self._start["machine"] = machine_busy_s()

    def stop(self) -> dict[str, float]:
        """Cores used per group over the span (1.0 = one core all the time)."""
        wall = self.wall_s = max(time.monotonic() - self._wall, 1e-9)
        used = {
            name: (cpu_s(pids) - self._start[name]) / wall for name, pids in self.groups.items()
        }
        used["machine"] = (machine_busy_s() - self._start["machine"]) / wall
        return used


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time s, RSS MB) points, in MB per minute."""
    if len(points) < 3:
        return float("nan")
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return float("nan")
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60
