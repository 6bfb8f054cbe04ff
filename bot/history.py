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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from bot.domain import (
    Attachment,
    JobProgress,
    Picture,
    Recall,
    SlackFile,
    ThreadHold,
    ThreadKey,
    TokenCounter,
    Turn,
)
from bot.errors import ThreadBusy
from bot.redis_client import glob_escape, keys_matching, redis_errors

log = logging.getLogger(__name__)

PAGE_SIZE = 64
NAME_CACHE_SECONDS = 24 * 3600
# A job's progress matters only while it can still be retried; its worker deletes it once done.
PROGRESS_SECONDS = 3600
LOCK_WAIT_SECONDS = 180.0
# How a reply waiting for its thread retries: first after a millisecond, because a follow-up often arrives
# while the previous reply is still storing its answer (the step that releases it); then twice as long
# each time up to 10 ms, so a thread held for a long answer costs at most 100 tries a second.
LOCK_FIRST_POLL_SECONDS = 0.001
LOCK_POLL_SECONDS = 0.01
# Store a job's question (or answer) once, however often the job is tried: the job's progress hash says
# whether it was stored, in the same step. Past the cap, the oldest turns go but the thread's first
# message stays (it is kept word for word), and the summary's span shifts with the turns that went.
# An answer is the last thing a reply stores under the thread's lock, so the same step can let the
# thread go (when it still holds the token: a lock whose lease ran out may be another's by now).
# KEYS: turns, progress, memory, lock. ARGV: the progress field, how many turns to keep, the thread TTL,
# the progress TTL, the encoded turn, the lock's token to release ('' to keep the lock).
_STORE_ONCE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 1 then
  local over = redis.call('RPUSH', KEYS[1], ARGV[5]) - tonumber(ARGV[2])
  if over > 0 then
    local first = redis.call('LINDEX', KEYS[1], 0)
    redis.call('LTRIM', KEYS[1], over + 1, -1)
    redis.call('LPUSH', KEYS[1], first)
    local through = tonumber(redis.call('HGET', KEYS[3], 'through') or '1')
    if through > 1 then redis.call('HSET', KEYS[3], 'through', math.max(1, through - over)) end
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
"""
# A new summary replaces the old only if nothing changed the thread's memory while it was written (a
# deletion or an edit reset it, the cap shifted it, the thread went). KEYS: memory, turns. ARGV: the
# generation and span end it was written from, its new span end, the summary, its tokens, their
# encoding, the thread TTL.
_SAVE_SUMMARY = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'gen') or '0') ~= ARGV[1] then return 0 end
if (redis.call('HGET', KEYS[1], 'through') or '1') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'through', ARGV[3], 'summary', ARGV[4], 'tokens', ARGV[5], 'enc', ARGV[6])
redis.call('HSET', KEYS[1], 'noted', 1)
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"""
# Token counts worked out while reading a thread, kept for the next read: each turn is set only if it is
# still the one read (ARGV: position, the turn as read, the turn counted; repeated).
_KEEP_COUNTS = """
for i = 1, #ARGV, 3 do
  if redis.call('LINDEX', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('LSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
"""
SUMMARIZING_SECONDS = 300  # one thread's summary is written by one worker at a time


@dataclasses.dataclass(frozen=True, slots=True)
class StoredSummary:
    """A thread's summary as kept: its text and tokens, the span end (positions 1 up to ``until`` are
    summarized) and the generation it belongs to (reset by deletions and edits)."""

    text: str
    tokens: int
    until: int
    generation: str


async def _acquire(lock: Lock, token: str, wait_seconds: float) -> bool:
    """Take ``lock``, retrying after 1, 2, 4, 8, then every 10 ms; False after ``wait_seconds``."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + wait_seconds
    pause = LOCK_FIRST_POLL_SECONDS
    while not await lock.acquire(blocking=False, token=token):
        if loop.time() + pause > give_up_at:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, LOCK_POLL_SECONDS)
    return True


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
        lock_wait_seconds: float = LOCK_WAIT_SECONDS,
        retention: Callable[[ThreadKey], Awaitable[int]] | None = None,
    ) -> None:
        self._redis = client
        self._counter = counter
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._retention = retention  # a channel's own, shorter, lifetime for its threads
        self._max_turns = max_turns
        self._lock_lease = lock_lease_seconds
        self._lock_wait = lock_wait_seconds
        self._store_once = client.register_script(_STORE_ONCE)
        self._save_summary = client.register_script(_SAVE_SUMMARY)
        self._keep_counts_script = client.register_script(_KEEP_COUNTS)
        self._counts_to_keep: set[asyncio.Task[None]] = set()

    async def _ttl_for(self, key: ThreadKey) -> int:
        return await self._retention(key) if self._retention is not None else self._ttl

    def _key(self, key: ThreadKey, part: str) -> str:
        return f"{self._prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:{part}"

    @contextlib.asynccontextmanager
    async def lock(self, key: ThreadKey) -> AsyncIterator[ThreadHold]:
        """Hold the thread (SET NX PX, compare-and-delete release), renewing the short lease while held,
        so a holder that dies frees the thread within one lease. ``store_answer`` given the hold lets
        the thread go in the same step, before the block ends."""
        lock = self._redis.lock(self._key(key, "lock"), timeout=self._lock_lease)
        hold = ThreadHold(uuid.uuid4().hex)
        with redis_errors("locking a thread"):
            if not await _acquire(lock, hold.token, self._lock_wait):
                raise ThreadBusy(f"thread {key} stayed locked for {self._lock_wait:.0f}s")
        renewal = asyncio.create_task(self._renew(lock, hold))
        try:
            yield hold
        finally:
            renewal.cancel()
            if not hold.released:
                with contextlib.suppress(LockError, RedisError):
                    await lock.release()

    async def _renew(self, lock: Lock, hold: ThreadHold) -> None:
        while True:
            await asyncio.sleep(self._lock_lease / 3)
            try:
                await lock.reacquire()
            except (LockError, RedisError) as exc:
                if not hold.released:  # else storing the answer let the thread go as this renewal went
                    log.warning("could not renew a thread lock: %s", type(exc).__name__)
                return

    async def recall(self, key: ThreadKey, token_budget: int, *, without_ts: str = "") -> Recall:
        """The first message, the summary and the newest-first turns after the summary's span until their
        tokens pass ``token_budget``: the first page in one round trip with the memory, then pages of
        LRANGE from the end that double in size (64, 128, 256, ...), so a budget of a few hundred turns
        costs two or three round trips and a short thread one."""
        turns_key = self._key(key, "turns")
        with redis_errors("reading a thread"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._key(key, "memory"))
                pipe.llen(turns_key)
                pipe.lindex(turns_key, 0)
                pipe.lrange(turns_key, -PAGE_SIZE, -1)
                memory, length, first_raw, page = await pipe.execute()
            summary = self._summary(memory)
            floor = max(summary.until, 1)  # positions below are the first message and the summary's
            turns: list[Turn] = []
            positions: list[int] = []
            recounted: dict[int, tuple[str, Turn]] = {}  # position -> the turn as read, counted
            total, newest, size = 0, length - 1, PAGE_SIZE
            while newest >= floor:
                for offset, raw in enumerate(reversed(page)):
                    position = newest - offset
                    if position < floor or total > token_budget:
                        break
                    turn = _decode(raw)
                    if turn.encoding != self._counter.encoding_name:
                        turn = self._recount(turn)
                        recounted[position] = (raw, turn)
                    if turn.ts and turn.ts == without_ts:
                        continue
                    turns.append(turn)
                    positions.append(position)
                    total += turn.tokens
                newest -= len(page)
                if total > token_budget or len(page) < size or newest < floor:
                    break
                size *= 2
                page = await self._redis.lrange(turns_key, max(newest - size + 1, floor), newest)
            first = _decode(first_raw) if first_raw is not None else None
            if first is not None and first.encoding != self._counter.encoding_name:
                first = self._recount(first)
                recounted[0] = (first_raw, first)
            if first is not None and without_ts and first.ts == without_ts:
                first = None  # the question itself: the context carries it last
        if recounted:
            # Written while the reply goes on (the answer never waits for it); safe without the lock.
            task = asyncio.create_task(self._keep_counts(turns_key, recounted))
            self._counts_to_keep.add(task)
            task.add_done_callback(self._counts_to_keep.discard)
        return Recall(
            tuple(turns),
            tuple(positions),
            first,
            summary.text,
            summary.tokens,
            summary.until,
            noted=memory.get("noted") == "1",
            # A thread whose memory hash outlived its turns is still one the bot knows.
            remembered=length > 0 or bool(memory),
        )

    def _summary(self, memory: Any) -> StoredSummary:  # decoded field -> value
        text = memory.get("summary", "")
        tokens = int(memory.get("tokens", 0))
        if text and memory.get("enc") != self._counter.encoding_name:
            tokens = self._counter.message_tokens("system", text)
        return StoredSummary(text, tokens, int(memory.get("through", 1)), memory.get("gen", "0"))

    def _recount(self, turn: Turn) -> Turn:
        tokens = self._counter.message_tokens(turn.role, turn.content) + turn.picture_tokens
        return replace(turn, tokens=tokens, encoding=self._counter.encoding_name)

    async def _keep_counts(self, turns_key: str, recounted: dict[int, tuple[str, Turn]]) -> None:
        args = [part for at, (raw, turn) in recounted.items() for part in (at, raw, _encode(turn))]
        try:
            await self._keep_counts_script(keys=[turns_key], args=args)
        except RedisError as exc:  # only a saving: the next read counts them again
            log.info("could not keep token counts: %s", type(exc).__name__)

    async def _rewrite(self, key: ThreadKey, turns: dict[int, Turn]) -> None:
        # Callers hold the thread lock, so the positions still point at the same turns.
        async with self._redis.pipeline(transaction=True) as pipe:
            for index, turn in turns.items():
                pipe.lset(self._key(key, "turns"), index, _encode(turn))
            await pipe.execute()

    async def seed(self, key: ThreadKey, turns: Sequence[Turn]) -> None:
        if not turns:
            return
        turns_key = self._key(key, "turns")
        if len(turns) > self._max_turns:  # the first message and the newest, as the cap keeps them
            turns = [turns[0], *turns[len(turns) - self._max_turns + 1 :]]
        ttl = await self._ttl_for(key)
        with redis_errors("storing a thread read from Slack"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(turns_key, *(_encode(t) for t in turns))
                pipe.expire(turns_key, ttl)
                await pipe.execute()

    async def forget_message(self, key: ThreadKey, ts: str) -> list[Turn]:
        """Delete the turn of the message ``ts`` (deleted in Slack); what was deleted. The caller holds
        the thread lock."""
        return await self._forget_turns(key, lambda turn: turn.ts == ts)

    async def forget_speaker(self, key: ThreadKey, user: str) -> list[Turn]:
        """Delete every turn ``user`` wrote in the thread (``/forget me``); what was deleted. The caller
        holds the thread lock."""
        return await self._forget_turns(key, lambda turn: turn.role == "user" and turn.speaker_id == user)

    async def _forget_turns(self, key: ThreadKey, which: Callable[[Turn], bool]) -> list[Turn]:
        # Reads the whole thread: deletions are rare and off the reply path.
        turns_key = self._key(key, "turns")
        with redis_errors("forgetting messages"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            gone = [(i, raw, turn) for i, raw in enumerate(raws) if which(turn := _decode(raw))]
            for _, raw, _ in gone:
                await self._redis.lrem(turns_key, 0, raw if isinstance(raw, str) else raw.decode())
        await self._summary_changed(key, [i for i, _, _ in gone])
        return [turn for _, _, turn in gone]

    async def threads(self, team: str) -> list[ThreadKey]:
        """Every thread of the workspace the bot keeps turns of (by SCAN, for erasure)."""
        keys = await keys_matching(self._redis, f"{glob_escape(self._prefix)}{{{team}:*}}:turns")
        found = []
        for key in keys:
            tag = key[len(self._prefix) :].partition("}")[0].lstrip("{").split(":")
            if len(tag) == 3:
                found.append(ThreadKey(*tag))
        return found

    async def edit_message(self, key: ThreadKey, ts: str, text: str) -> bool:
        """Give the stored turn of the message ``ts`` (edited in Slack) its new ``text``, recounted; False
        when the thread does not hold it. The caller holds the thread lock (list indexes stay put).
        Reads the whole thread: edits are rare and off the reply path."""
        turns_key = self._key(key, "turns")
        with redis_errors("changing an edited message"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            edited = {
                index: self._recount(replace(turn, text=text))
                for index, raw in enumerate(raws)
                if (turn := _decode(raw)).ts == ts and turn.role == "user"
            }
            if edited:
                await self._rewrite(key, edited)
        await self._summary_changed(key, list(edited))
        return bool(edited)

    async def forget_file(self, key: ThreadKey, file_id: str) -> list[Attachment]:
        """Take the file ``file_id`` out of every turn of the thread that holds it, recounting those
        turns; what was taken out. The caller holds the thread lock (list indexes stay put)."""
        turns_key = self._key(key, "turns")
        removed: list[Attachment] = []
        changed: list[int] = []
        with redis_errors("forgetting a file"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            async with self._redis.pipeline(transaction=True) as pipe:
                for index, raw in enumerate(raws):
                    turn = _decode(raw)
                    kept = tuple(a for a in turn.attachments if a.file.id != file_id)
                    if len(kept) < len(turn.attachments):
                        removed += [a for a in turn.attachments if a.file.id == file_id]
                        changed.append(index)
                        pipe.lset(turns_key, index, _encode(self._recount(replace(turn, attachments=kept))))
                await pipe.execute()
        await self._summary_changed(key, changed)
        return removed

    async def forget_thread(self, key: ThreadKey) -> list[Turn]:
        """Delete everything this module keeps of a thread (its parent was deleted in Slack); the turns
        it held, so that other owners can forget what they keep about them."""
        turns_key = self._key(key, "turns")
        with redis_errors("forgetting a thread"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            await self._redis.delete(turns_key, self._key(key, "memory"))
        return [_decode(raw) for raw in raws]

    async def _summary_changed(self, key: ThreadKey, positions: Sequence[int]) -> None:
        """Turns at ``positions`` changed or went: a summary that covered any of them is built again."""
        if not positions:
            return
        with redis_errors("reading a thread's summary"):
            until = int(await self._redis.hget(self._key(key, "memory"), "through") or 1)
        if any(0 < position < until for position in positions):
            await self.reset_summary(key)

    async def start_over(self, key: ThreadKey) -> list[Turn]:
        """Forget the thread's turns and summary, yet keep knowing the thread (its memory hash stays),
        so that the next question is not answered from a fresh reading of the thread in Slack; what
        was forgotten. The caller holds the thread lock."""
        turns_key = self._key(key, "turns")
        with redis_errors("starting a thread over"):
            raws = await self._redis.lrange(turns_key, 0, -1)
            await self._redis.delete(turns_key)
        await self.reset_summary(key)
        return [_decode(raw) for raw in raws]

    async def reset_summary(self, key: ThreadKey) -> None:
        """Throw the thread's summary away (a turn it covered changed or went): the next replies build it
        again from the turns that remain. The caller holds the thread lock."""
        memory = self._key(key, "memory")
        ttl = await self._ttl_for(key)
        with redis_errors("resetting a thread's summary"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(memory, "summary", "tokens", "enc")
                pipe.hset(memory, "through", 1)
                pipe.hincrby(memory, "gen", 1)
                pipe.expire(memory, ttl)
                await pipe.execute()

    async def summary(self, key: ThreadKey) -> StoredSummary:
        """The thread's summary as kept (empty, covering nothing, when it has none)."""
        with redis_errors("reading a thread's summary"):
            memory = await self._redis.hgetall(self._key(key, "memory"))
        return self._summary(memory)

    async def turns_between(self, key: ThreadKey, start: int, stop: int, token_budget: int) -> list[Turn]:
        """The turns at positions ``start`` up to ``stop``, oldest first, while their tokens stay within
        ``token_budget`` (the first one whatever its size): what one summarizer call reads."""
        turns: list[Turn] = []
        total = 0
        with redis_errors("reading turns to summarize"):
            while start < stop:
                page = await self._redis.lrange(
                    self._key(key, "turns"), start, min(stop, start + PAGE_SIZE) - 1
                )
                for raw in page:
                    turn = _decode(raw)
                    if turn.encoding != self._counter.encoding_name:
                        turn = self._recount(turn)
                    if turns and total + turn.tokens > token_budget:
                        return turns
                    turns.append(turn)
                    total += turn.tokens
                if len(page) < PAGE_SIZE:
                    break
                start += PAGE_SIZE
        return turns

    async def save_summary(self, key: ThreadKey, since: StoredSummary, until: int, text: str) -> bool:
        """Keep ``text`` as the summary of positions 1 up to ``until``, written from ``since``; False
        when the thread's memory changed meanwhile (the summary is then dropped)."""
        tokens = self._counter.message_tokens("system", text)
        args: list[str | int] = [
            since.generation,
            since.until,
            until,
            text,
            tokens,
            self._counter.encoding_name,
            await self._ttl_for(key),
        ]
        with redis_errors("storing a thread's summary"):
            saved = await self._save_summary(
                keys=[self._key(key, "memory"), self._key(key, "turns")], args=args
            )
        return bool(saved)

    @contextlib.asynccontextmanager
    async def summarizing(self, key: ThreadKey) -> AsyncIterator[bool]:
        """Hold the thread's summary while it is written, without waiting: yields False when another
        worker writes it already (that one will cover what this one would have)."""
        lock = self._redis.lock(self._key(key, "summarizing"), timeout=SUMMARIZING_SECONDS, blocking=False)
        with redis_errors("taking a thread's summary"):
            held = bool(await lock.acquire())
        try:
            yield held
        finally:
            if held:
                with contextlib.suppress(LockError, RedisError):
                    await lock.release()

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

    async def store_answer(
        self, key: ThreadKey, job_id: str, turn: Turn, *, releasing: ThreadHold | None = None
    ) -> None:
        await self._store(key, job_id, "answer", turn, action="storing an answer", releasing=releasing)
        if releasing is not None:
            releasing.released = True

    async def _store(
        self,
        key: ThreadKey,
        job_id: str,
        field: str,
        turn: Turn,
        *,
        action: str,
        releasing: ThreadHold | None = None,
    ) -> None:
        progress = self._progress_key(key, job_id)
        keys = [self._key(key, "turns"), progress, self._key(key, "memory"), self._key(key, "lock")]
        ttl = await self._ttl_for(key)
        token = releasing.token if releasing is not None else ""
        with redis_errors(action):
            await self._store_once(
                keys=keys, args=[field, self._max_turns, ttl, PROGRESS_SECONDS, _encode(turn), token]
            )

    async def record_part(self, key: ThreadKey, job_id: str, index: int, ts: str) -> None:
        progress = self._progress_key(key, job_id)
        # One round trip without MULTI: both commands may be repeated (a retry does), so nothing is
        # gained by making them one step.
        with redis_errors("recording a reply message"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(progress, f"part:{index}", ts)
                pipe.expire(progress, PROGRESS_SECONDS)
                await pipe.execute()

    async def mark_answered(self, key: ThreadKey, job_id: str) -> None:
        progress = self._progress_key(key, job_id)
        with redis_errors("marking a job answered"):
            async with self._redis.pipeline(transaction=False) as pipe:  # as record_part
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

    async def forget_name(self, team: str, user_id: str) -> bool:
        """Drop a cached display name; True when there was one."""
        with redis_errors("forgetting a display name"):
            return bool(await self._redis.delete(f"{self._prefix}user:{team}:{user_id}"))

    async def cache_name(self, team: str, user_id: str, name: str) -> None:
        key = f"{self._prefix}user:{team}:{user_id}"
        with redis_errors("caching a display name"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, "name", name)
                pipe.expire(key, NAME_CACHE_SECONDS)
                await pipe.execute()
