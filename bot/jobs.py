"""The job queue: accepted Slack messages on a Redis Stream, read by workers in one consumer group.

Keys (docs/architecture.md), all under the hash tag ``{T:jobs}`` of the bot's workspace so that a
workspace's queue is one Redis Cluster slot and every script below stays legal there:

- ``{prefix}{T:jobs}:queue``: the stream of jobs waiting or being answered (consumer group ``workers``);
- ``{prefix}{T:jobs}:dead``: jobs that failed every attempt, with why, for an operator to look at;
- ``{prefix}{T:jobs}:seen:{T}:{C}:{ts}``: one marker per Slack message for an hour, so a message Slack
  delivers twice (retries, the ``app_mention`` and ``message`` twins, several ingress replicas) is
  queued once;
- ``{prefix}{T:jobs}:joined:{T}:{C}:{TS}``: the threads the bot takes part in (it accepted a question
  there), whose follow-ups it answers without a mention; kept as long as a thread's history;
- ``{prefix}{T:jobs}:shortcut:{id}``: a message shortcut waiting for its modal's submission (the
  message it was used on, its files, where to answer), for as long as Slack's response URL lives.

A job's life: ``accept`` decides in one script whether a message is for the bot (addressed to it, or
said in a thread it joined), whether it was queued before, and queues it, joining its thread; only
then may the ingress acknowledge Slack. A worker takes it (``take``, delivery 1) and renews its lease
while it works (``renew``: XCLAIM JUSTID resets the idle time, only while the job is still its own).
When done it is acknowledged and deleted (``ack``). A job whose worker stopped renewing for a whole
lease is ``reclaim``-ed by any worker, its delivery count raised; a job delivered more than
``max_attempts`` times goes to the dead-letter stream instead (``dead_letter``). Every Redis failure
leaves this module as a ``HistoryError``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import ResponseError

from bot.domain import Change, Deletion, Edit, Incoming, Job, Shortcut, SlackFile, ThreadKey
from bot.redis_client import glob_escape, keys_matching, redis_errors

GROUP = "workers"
DEDUP_SECONDS = 3600
DEAD_LETTERS_KEPT = 10_000
SHORTCUT_HELD_SECONDS = 1800  # a shortcut's response URL works for 30 minutes
REFUSED_SECONDS = 86400  # a conversation where the bot does not answer is told so once a day

# KEYS: the message's marker, the queue, the thread's joined marker. ARGV: marker seconds, joined
# seconds, 1 when the job is only for a thread the bot joined (a message not addressed to it, a
# deletion), 1 when queueing it joins the thread (a message), then the job's fields and values. Nothing
# is written unless the job is queued: a failed XADD leaves no marker behind.
_ACCEPT = """
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then return {'ignored'} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'duplicate'} end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
if ARGV[4] == '1' then redis.call('SET', KEYS[3], 1, 'EX', ARGV[2]) end
return {'queued', id}
"""

# KEYS: the queue. ARGV: group, consumer, minimum idle ms, count. Claims jobs idle for a whole lease and
# returns {id, fields, deliveries} for each; an entry deleted while pending is just acknowledged.
_RECLAIM = """
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local out = {}
for _, entry in ipairs(claimed[2]) do
  if entry[2] then
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
    table.insert(out, {entry[1], entry[2], pending[1][4]})
  else
    redis.call('XACK', KEYS[1], ARGV[1], entry[1])
  end
end
return out
"""

# KEYS: the queue. ARGV: group, consumer, ids. Resets the idle time of each job still owned by this
# consumer; returns the ids it no longer owns (another worker reclaimed them).
_RENEW = """
local lost = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


@dataclass(frozen=True, slots=True)
class Acceptance:
    """What the queue made of a message: ``queued`` (with the job's id), ``duplicate`` (queued before),
    or ``ignored`` (said in a thread the bot takes no part in, without addressing it)."""

    outcome: str
    job_id: str | None = None


def consumer_name() -> str:
    """This process's name in the consumer group: host, pid and a random suffix (pids get reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _encode(work: Incoming | Change | Shortcut) -> bytes:
    if isinstance(work, Shortcut):
        return orjson.dumps({"kind": "shortcut", "shortcut": dataclasses.asdict(work)})
    if isinstance(work, Edit):
        return orjson.dumps({"kind": "edit", "edit": dataclasses.asdict(work)})
    if isinstance(work, Deletion):
        key = work.key
        thread = [key.channel, key.thread_ts] if key else None
        return orjson.dumps(
            {"kind": "deletion", "team": work.team, "thread": thread, "ts": work.ts, "file": work.file_id}
        )
    key = work.key
    return orjson.dumps(
        {
            "team": key.team,
            "channel": key.channel,
            "thread_ts": key.thread_ts,
            "ts": work.ts,
            "user": work.user_id,
            "text": work.text,
            "addressed": work.addressed,
            "dm": work.is_dm,
            "files": [dataclasses.asdict(f) for f in work.files],
        }
    )


def _decode(job_id: str, fields: Any, attempt: int) -> Job:
    # Scripts hand back a flat [field, value, ...] list, redis-py a dict.
    values = fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2], strict=True))
    data = orjson.loads(values["job"])
    work: Incoming | Change | Shortcut
    if data.get("kind") == "shortcut":
        work = _shortcut(data)
    elif data.get("kind") == "edit":
        fields = data["edit"]
        work = Edit(**{**fields, "key": ThreadKey(**fields["key"])})
    elif data.get("kind") == "deletion":
        thread = data["thread"]
        key = ThreadKey(data["team"], thread[0], thread[1]) if thread else None
        work = Deletion(data["team"], key, data["ts"], data["file"])
    else:
        work = Incoming(
            key=ThreadKey(data["team"], data["channel"], data["thread_ts"]),
            ts=data["ts"],
            user_id=data["user"],
            text=data["text"],
            addressed=data["addressed"],
            is_dm=data["dm"],
            files=tuple(SlackFile(**f) for f in data.get("files", ())),
        )
    return Job(id=str(job_id), work=work, attempt=int(attempt), enqueued_at=float(values["at"]))


def _job_user(raw: str | bytes) -> str:
    """Who asked, in an encoded job ("" for a change: nobody waits for it)."""
    data = orjson.loads(raw)
    return str(data["shortcut"]["user_id"] if data.get("kind") == "shortcut" else data.get("user", ""))


def _shortcut(data: dict[str, Any]) -> Shortcut:
    fields = data["shortcut"]
    return Shortcut(
        **{
            **fields,
            "key": ThreadKey(**fields["key"]),
            "files": tuple(SlackFile(**f) for f in fields["files"]),
        }
    )


class JobQueue:
    """The bot workspace's job stream and its consumer group, seen from one process."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        team: str,
        lease_seconds: float,
        max_attempts: int,
        joined_seconds: int = 30 * 24 * 3600,
        consumer: str | None = None,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._team = team
        self._joined_seconds = joined_seconds
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.consumer = consumer or consumer_name()
        self.queue_key = self._key("queue")
        self.dead_key = self._key("dead")
        self._accept = client.register_script(_ACCEPT)
        self._reclaim = client.register_script(_RECLAIM)
        self._renew = client.register_script(_RENEW)

    def _key(self, part: str) -> str:
        return f"{self._prefix}{{{self._team}:jobs}}:{part}"

    def _joined(self, key: ThreadKey) -> str:
        return self._key(f"joined:{key.team}:{key.channel}:{key.thread_ts}")

    async def accept(self, work: Incoming | Change | Shortcut) -> Acceptance:
        """Queue a job for ``work`` if it concerns the bot and was not queued before: a message addressed
        to it or said in a thread it joined (which joins the thread), an edit or a deletion in a thread
        it joined, a deleted file (wherever the bot may keep it), a shortcut someone used (which joins
        nothing: the thread's people did not ask the bot in)."""
        if isinstance(work, Incoming):
            team, joined = work.key.team, self._joined(work.key)
            only_if_joined, joins = not work.addressed, True
        elif isinstance(work, Shortcut):
            team, joined = work.key.team, self._key("joined:none")
            only_if_joined, joins = False, False
        else:
            team, joins = work.team, False
            joined = self._joined(work.key) if work.key else self._key("joined:none")
            only_if_joined = work.key is not None
        marker = self._key(f"seen:{team}:{work.dedup_key}")
        with redis_errors("queueing a job"):
            outcome, *job_id = await self._accept(
                keys=[marker, self.queue_key, joined],
                args=[
                    DEDUP_SECONDS,
                    self._joined_seconds,
                    int(only_if_joined),
                    int(joins),
                    "job",
                    _encode(work),
                    "at",
                    repr(time.time()),
                ],
            )
        return Acceptance(str(outcome), str(job_id[0]) if job_id else None)

    async def hold(self, shortcut: Shortcut) -> None:
        """Keep a shortcut until its modal is submitted (``held``), for as long as its response URL lives."""
        with redis_errors("keeping a shortcut"):
            await self._redis.set(
                self._key(f"shortcut:{shortcut.id}"), _encode(shortcut), ex=SHORTCUT_HELD_SECONDS
            )

    async def held(self, shortcut_id: str) -> Shortcut | None:
        """The shortcut ``hold`` kept under ``shortcut_id``; None once it expired."""
        with redis_errors("reading a shortcut"):
            raw = await self._redis.get(self._key(f"shortcut:{shortcut_id}"))
        return _shortcut(orjson.loads(raw)) if raw else None

    async def leave(self, key: ThreadKey) -> None:
        """Take no more part in a thread (it was deleted): its follow-ups need a mention again."""
        with redis_errors("leaving a thread"):
            await self._redis.delete(self._joined(key))

    async def first_refusal(self, channel: str) -> bool:
        """True the first time in a day that the bot refuses to answer in ``channel`` (it says where it
        can be used then, and keeps quiet after)."""
        with redis_errors("marking a refusal"):
            return bool(
                await self._redis.set(self._key(f"refused:{channel}"), 1, nx=True, ex=REFUSED_SECONDS)
            )

    async def forget_refusal(self, channel: str) -> None:
        """The refusal could not be told: the next one is told again."""
        with redis_errors("unmarking a refusal"):
            await self._redis.delete(self._key(f"refused:{channel}"))

    async def join(self, key: ThreadKey) -> None:
        """Take part in a thread as if asked there: its follow-ups are queued without a mention."""
        with redis_errors("joining a thread"):
            await self._redis.set(self._joined(key), 1, ex=self._joined_seconds)

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; jobs queued before it are kept."""
        with redis_errors("creating the workers' consumer group"):
            try:
                await self._redis.xgroup_create(self.queue_key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def take(self, count: int, block_ms: int) -> list[Job]:
        """Up to ``count`` new jobs, waiting up to ``block_ms`` for the first."""
        with redis_errors("reading jobs"):
            try:
                response: Any = await self._redis.xreadgroup(
                    GROUP, self.consumer, {self.queue_key: ">"}, count=count, block=block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()  # Redis lost the group (restarted without persistence)
                return []
        return [_decode(job_id, fields, 1) for _, entries in response or [] for job_id, fields in entries]

    async def reclaim(self, count: int) -> list[Job]:
        """Up to ``count`` jobs whose worker went silent for a whole lease, now this consumer's."""
        idle_ms = int(self.lease_seconds * 1000)
        with redis_errors("reclaiming jobs"):
            try:
                claimed = await self._reclaim(
                    keys=[self.queue_key], args=[GROUP, self.consumer, idle_ms, count]
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()  # Redis lost the group (restarted without persistence)
                return []
        return [_decode(job_id, fields, deliveries) for job_id, fields, deliveries in claimed]

    async def renew(self, job_ids: Iterable[str]) -> set[str]:
        """Extend this consumer's lease on ``job_ids``; the ids it lost to another worker."""
        ids = list(job_ids)
        if not ids:
            return set()
        with redis_errors("renewing job leases"):
            lost = await self._renew(keys=[self.queue_key], args=[GROUP, self.consumer, *ids])
        return {str(job_id) for job_id in lost}

    async def ack(self, job: Job) -> None:
        """The job is done: off the consumer's list and out of the stream."""
        with redis_errors("acknowledging a job"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.queue_key, GROUP, job.id)
                pipe.xdel(self.queue_key, job.id)
                await pipe.execute()

    async def dead_letter(self, job: Job, reason: str) -> None:
        """Move a job that failed every attempt to the dead-letter stream, in one step."""
        fields = {
            "job": _encode(job.work),
            "at": repr(job.enqueued_at),
            "id": job.id,
            "attempts": job.attempt - 1,
            "reason": reason,
        }
        with redis_errors("dead-lettering a job"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_key, fields, maxlen=DEAD_LETTERS_KEPT, approximate=True)  # type: ignore[arg-type]
                pipe.xack(self.queue_key, GROUP, job.id)
                pipe.xdel(self.queue_key, job.id)
                await pipe.execute()

    async def forget_person(self, user: str) -> int:
        """``/forget me``: the person's dead-lettered jobs and shortcuts waiting for their modal go. How
        many. (A job still queued is answered, and its turn then goes with the next ``/forget me``.)"""
        gone = 0
        with redis_errors("forgetting a person's jobs"):
            entries: Any = await self._redis.xrange(self.dead_key)
            mine = [entry_id for entry_id, fields in entries if _job_user(fields.get("job", "")) == user]
            if mine:
                gone += await self._redis.xdel(self.dead_key, *mine)
            for key in await keys_matching(self._redis, glob_escape(self._key("shortcut:")) + "*"):
                raw = await self._redis.get(key)
                if raw is not None and _job_user(raw) == user:
                    gone += await self._redis.delete(key)
        return gone

    async def depth(self) -> tuple[int, int]:
        """(jobs in the stream, of which being worked on): waiting = the first minus the second."""
        with redis_errors("measuring the queue"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.queue_key)
                pipe.xpending(self.queue_key, GROUP)
                try:
                    length, pending = await pipe.execute()
                except ResponseError:  # no group yet: nothing is being worked on
                    return int(await self._redis.xlen(self.queue_key)), 0
        return int(length), int(pending["pending"])

    async def dead_letters(self, count: int = 100) -> Sequence[Job]:
        """The newest dead-lettered jobs (for operators and tests)."""
        with redis_errors("reading dead letters"):
            entries: Any = await self._redis.xrevrange(self.dead_key, count=count)
        return [_decode(str(fields["id"]), fields, int(fields["attempts"])) for _, fields in entries]
