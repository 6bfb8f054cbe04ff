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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import LockError, RedisError

from bot.domain import Attachment, JobProgress, Picture, SlackFile, ThreadKey, TokenCounter, Turn
from bot.errors import ThreadBusy
from bot.redis_client import redis_errors

log = logging.getLogger(__name__)

PAGE_SIZE = 64
NAME_CACHE_SECONDS = 24 * 3600
# A job's progress matters only while it can still be retried; its worker deletes it once done.
PROGRESS_SECONDS = 3600
LOCK_WAIT_SECONDS = 180.0
# How often a reply waiting for its thread retries: a follow-up often arrives while the previous reply is
# still storing its answer, a few milliseconds from release.
LOCK_POLL_SECONDS = 0.01
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
    data: dict[str, Any] = {
        "role": turn.role,
        "text": turn.text,
        "tokens": turn.tokens,
        "enc": turn.encoding,
        "ts": turn.ts,
        "uid": turn.speaker_id,
        "name": turn.speaker_name,
    }
    if turn.attachments:
        data["files"] = [dataclasses.asdict(a) for a in turn.attachments]
    return orjson.dumps(data).decode()


def _decode(raw: str | bytes) -> Turn:
    data = orjson.loads(raw)
    files = data.get("files")
    return Turn(
        role=data["role"],
        text=data["text"],
        tokens=data["tokens"],
        encoding=data["enc"],
        ts=data.get("ts", ""),
        speaker_id=data.get("uid", ""),
        speaker_name=data.get("name", ""),
        attachments=tuple(map(_attachment, files)) if files else (),
    )


def _attachment(data: dict[str, Any]) -> Attachment:
    picture = data.get("picture")
    return Attachment(
        file=SlackFile(**data["file"]),
        text=data["text"],
        picture=Picture(**picture) if picture else None,
        problem=data.get("problem", ""),
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
        tokens = self._counter.message_tokens(turn.role, turn.content) + turn.picture_tokens
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

    async def forget_message(self, key: ThreadKey, ts: str) -> list[Turn]:
        """Delete the turn of the message ``ts`` (deleted in Slack); what was deleted. The caller holds
        the thread lock. Reads the whole thread: deletions are rare and off the reply path."""
        turns_key = self._key(key, "turns")
        with redis_errors("forgetting a message"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            gone = [(raw, turn) for raw in raws if (turn := _decode(raw)).ts == ts]
            for raw, _ in gone:
                await self._redis.lrem(turns_key, 0, raw if isinstance(raw, str) else raw.decode())
        return [turn for _, turn in gone]

    async def forget_file(self, key: ThreadKey, file_id: str) -> list[Attachment]:
        """Take the file ``file_id`` out of every turn of the thread that holds it, recounting those
        turns; what was taken out. The caller holds the thread lock (list indexes stay put)."""
        turns_key = self._key(key, "turns")
        removed: list[Attachment] = []
        with redis_errors("forgetting a file"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            async with self._redis.pipeline(transaction=True) as pipe:
                for index, raw in enumerate(raws):
                    turn = _decode(raw)
                    kept = tuple(a for a in turn.attachments if a.file.id != file_id)
                    if len(kept) < len(turn.attachments):
                        removed += [a for a in turn.attachments if a.file.id == file_id]
                        pipe.lset(turns_key, index, _encode(self._recount(replace(turn, attachments=kept))))
                await pipe.execute()
        return removed

    async def forget_thread(self, key: ThreadKey) -> list[Turn]:
        """Delete everything this module keeps of a thread (its parent was deleted in Slack); the turns
        it held, so that other owners can forget what they keep about them."""
        turns_key = self._key(key, "turns")
        with redis_errors("forgetting a thread"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            await self._redis.delete(turns_key)
        return [_decode(raw) for raw in raws]

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

    async def mark_answered(self, key: ThreadKey, job_id: str) -> None:
        progress = self._progress_key(key, job_id)
        with redis_errors("marking a job answered"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(progress, "answer", 1)
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
