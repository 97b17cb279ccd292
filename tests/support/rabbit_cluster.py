"""A RabbitMQ cluster of the test's own: three nodes beside the machine's broker, each with its
own node name, ports and data folder, clustered with a cookie of their own (kept in the
cluster's folder, given to the nodes and to the CLI as $HOME), so nothing here can reach or
change the machine's node. Stopped, and its folder removed, however the test ends."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import free_port

RABBITMQ_BIN = Path(os.environ.get("EDRONE_BRIDGE_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
START_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 60.0


class ClusterError(RuntimeError):
    """A node of the test's cluster did not do what it was told; the message has its log."""


@dataclass
class Node:
    name: str  # the Erlang node name, "<prefix>-a@localhost"
    home: Path  # the cluster's folder: the cookie, for the node and the CLI
    base: Path  # this node's folder
    amqp_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid_file(self) -> Path:
        return self.base / "node.pid"

    def env(self) -> dict[str, str]:
        config = self.base / "rabbitmq.conf"
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.base / "plugins"),
            # Erlang's distribution on loopback only, as the machine's node has it.
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"management.tcp.port = {self.management_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            "loopback_users = none\n"
            # The machine has other work: no disk alarm for a small tmp, a modest memory share.
            "disk_free_limit.absolute = 50MB\n"
            "vm_memory_high_watermark.relative = 0.2\n"
        )
        (self.base / "advanced.config").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n")

    def vm_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted((self.base / "log").glob("*.log")) if (self.base / "log").exists() else []
        text = "".join(path.read_text(errors="replace")[-chars:] for path in logs)
        return (self.base / "console.log").read_text(errors="replace")[-chars:] + text


@dataclass
class Cluster:
    nodes: list[Node]
    home: Path

    @property
    def amqp_urls(self) -> list[str]:
        return [node.amqp_url for node in self.nodes]

    def node(self, name: str) -> Node:
        """The node of an Erlang node name (as the management API gives a queue's leader)."""
        [found] = [node for node in self.nodes if node.name == name]
        return found

    async def cli(self, tool: str, node: Node, *args: str, check: bool = True) -> str:
        process = await asyncio.create_subprocess_exec(
            str(RABBITMQ_BIN / tool),
            "-n",
            node.name,
            *args,
            env=node.env(),
            # Where an Erlang VM that fails writes its erl_crash.dump: not the repository.
            cwd=self.home,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ClusterError(f"{tool} {' '.join(args)} on {node.name}: no end") from None
        text = output.decode(errors="replace")
        if check and process.returncode != 0:
            raise ClusterError(f"{tool} {' '.join(args)} on {node.name}: {text}")
        return text

    async def start(self, node: Node) -> None:
        """Start ``node`` (again: its data is kept) and wait until it serves."""
        with (node.base / "console.log").open("ab") as console:
            node.process = await asyncio.create_subprocess_exec(
                str(RABBITMQ_BIN / "rabbitmq-server"),
                env=node.env(),
                cwd=node.base,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                start_new_session=True,
            )
        # await_startup fails at once while the node has not yet registered with epmd.
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                await self.cli("rabbitmqctl", node, "await_startup", "--timeout", "90")
                return
            except ClusterError as exc:
                if not node.running or time.monotonic() > deadline:
                    raise ClusterError(f"{exc}\n{node.log_tail()}") from None
            await asyncio.sleep(0.5)

    async def kill(self, node: Node) -> float:
        """``kill -9`` of the node's Erlang VM, as a crash; the time it happened."""
        pid = node.vm_pid()
        if pid is None:
            raise ClusterError(f"{node.name} has no pid file")
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        if node.process is not None:
            await asyncio.wait_for(node.process.wait(), 30)
        return killed_at

    async def stop(self, node: Node) -> None:
        """A clean stop, as an operator does one."""
        await self.cli("rabbitmqctl", node, "stop")
        if node.process is not None:
            await asyncio.wait_for(node.process.wait(), 60)

    async def join(self, node: Node, seed: Node) -> None:
        await self.cli("rabbitmqctl", node, "stop_app")
        await self.cli("rabbitmqctl", node, "join_cluster", seed.name)
        await self.cli("rabbitmqctl", node, "start_app")

    async def leaders(self, node: Node, queues: Sequence[str]) -> dict[str, str]:
        """Each quorum queue's leader, as ``node`` sees it."""
        output = await self.cli(
            "rabbitmqctl", node, "list_queues", "-q", "--no-table-headers", "name", "leader"
        )
        found = dict(line.split()[:2] for line in output.splitlines() if len(line.split()) >= 2)
        return {queue: found[queue] for queue in queues if queue in found}

    async def shutdown(self) -> None:
        for node in self.nodes:
            pid = node.vm_pid()
            if node.process is not None and node.process.returncode is None and pid is not None:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if node.process is not None and node.process.returncode is None:
                with suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGKILL)
                await node.process.wait()
        # epmd keeps the names of killed nodes only until their sockets close: nothing to do.
        shutil.rmtree(self.home, ignore_errors=True)


@asynccontextmanager
async def rabbit_cluster(size: int = 3) -> AsyncIterator[Cluster]:
    """``size`` nodes started and clustered; all of them stopped and their data removed at
    the end, on success and on failure."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        raise ClusterError(
            f"no rabbitmq-server in {RABBITMQ_BIN}: set EDRONE_BRIDGE_TEST_RABBITMQ_BIN to the "
            "folder of RabbitMQ's own scripts (not a wrapper that changes user)"
        )
    home = Path(tempfile.mkdtemp(prefix="edrone-bridge-cluster-"))
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20))
    cookie.chmod(0o400)
    prefix = f"ebt-{secrets.token_hex(3)}"
    nodes = [
        Node(f"{prefix}-{chr(ord('a') + i)}@localhost", home, home / chr(ord("a") + i))
        for i in range(size)
    ]
    cluster = Cluster(nodes, home)
    try:
        for node in nodes:
            node.write_config()
        await asyncio.gather(*(cluster.start(node) for node in nodes))
        for node in nodes[1:]:
            await cluster.join(node, nodes[0])
        yield cluster
    finally:
        await cluster.shutdown()
