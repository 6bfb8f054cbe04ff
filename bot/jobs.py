"""The job queue: accepted Slack messages on Redis Streams, read by workers in one consumer group.

A workspace's jobs are spread over ``JOB_STREAMS`` streams by thread, so that on a Redis Cluster no
single stream (and node) carries the whole workspace. Stream ``i``'s keys share the hash tag
``{T:jobs:i}`` (stream 0 keeps the plain ``{T:jobs}`` of the single stream of earlier versions, so an
upgrade loses no queued job), so every script below touches one slot (docs/architecture.md):

- ``{prefix}{T:jobs:i}:queue``: the stream of jobs waiting or being answered (consumer group ``workers``);
- ``{prefix}{T:jobs:i}:dead``: its jobs that failed every attempt, with why, for an operator to look at;
- ``{prefix}{T:jobs:i}:seen:{T}:{C}:{ts}``: one marker per Slack message for an hour, so a message
  Slack delivers twice (retries, the ``app_mention`` and ``message`` twins, several ingress replicas)
  is queued once;
- ``{prefix}{T:jobs:i}:joined:{T}:{C}:{TS}``: the threads the bot takes part in (it accepted a question
  there), whose follow-ups it answers without a mention; kept as long as a thread's history;
- ``{prefix}{T:jobs}:shortcut:{id}``: a message shortcut waiting for its modal's submission (the
  message it was used on, its files, where to answer), for as long as Slack's response URL lives.

A thread's jobs (and its markers) are always in the same stream, chosen by a hash of its channel and
ts, so they keep their order. A job's life: ``accept`` decides in one script whether a message is for
the bot (addressed to it, or said in a thread it joined), whether it was queued before, and queues it,
joining its thread; only then may the ingress acknowledge Slack. A worker reads every stream
(``take``, delivery 1) and renews its lease while it works (``renew``: XCLAIM JUSTID resets the idle
time, only while the job is still its own). When done it is acknowledged and deleted (``ack``). A job
whose worker stopped renewing for a whole lease is ``reclaim``-ed by any worker, its delivery count
raised; a job delivered more than ``max_attempts`` times goes to its stream's dead letters instead
(``dead_letter``). Every Redis failure leaves this module as a ``HistoryError``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import ResponseError

from bot.domain import Change, Deletion, Edit, Incoming, Job, JobRef, Shortcut, SlackFile, ThreadKey
from bot.errors import HistoryError
from bot.redis_client import glob_escape, keys_matching, redis_errors

GROUP = "workers"
DEDUP_SECONDS = 3600
DEAD_LETTERS_KEPT = 10_000
SHORTCUT_HELD_SECONDS = 1800  # a shortcut's response URL works for 30 minutes
REFUSED_SECONDS = 86400  # a conversation where the bot does not answer is told so once a day
# How many streams a workspace's jobs are spread over. Fixed: a thread's stream is its hash modulo this,
# so changing it would strand the jobs and markers already in Redis. Eight spreads a workspace over
# every node of a usual cluster and costs a worker eight cheap blocking reads.
JOB_STREAMS = 8

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


def _decode(job_id: str, fields: Any, attempt: int, stream: int) -> Job:
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
    return Job(
        id=str(job_id), work=work, attempt=int(attempt), enqueued_at=float(values["at"]), stream=stream
    )


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


def stream_of(key: ThreadKey | None, fallback: str = "") -> int:
    """The stream of a thread's jobs (of ``fallback``'s: a change that concerns no thread)."""
    name = f"{key.channel}:{key.thread_ts}" if key else fallback
    return zlib.crc32(name.encode()) % JOB_STREAMS


def stream_key(prefix: str, team: str, stream: int, part: str) -> str:
    """A key of one of the workspace's job streams, under that stream's hash tag."""
    tag = f"{team}:jobs" if stream == 0 else f"{team}:jobs:{stream}"
    return f"{prefix}{{{tag}}}:{part}"


def joined_key(prefix: str, team: str, key: ThreadKey) -> str:
    """The marker of a thread the bot (of workspace ``team``) takes part in, in the thread's stream."""
    return stream_key(prefix, team, stream_of(key), f"joined:{key.team}:{key.channel}:{key.thread_ts}")


def joined_pattern(prefix: str, team: str, channel: str) -> str:
    """A SCAN pattern for the joined markers of ``channel``'s threads, in every stream."""
    return glob_escape(f"{prefix}{{{team}:jobs") + "*" + glob_escape(f":joined:{team}:{channel}:") + "*"


class JobQueue:
    """The bot workspace's job streams and their consumer group, seen from one process."""

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
        self.streams = range(JOB_STREAMS)
        self.queue_keys = [self._key(stream, "queue") for stream in self.streams]
        self.dead_keys = [self._key(stream, "dead") for stream in self.streams]
        self._accept = client.register_script(_ACCEPT)
        self._reclaim = client.register_script(_RECLAIM)
        self._renew = client.register_script(_RENEW)

    def _key(self, stream: int, part: str) -> str:
        return stream_key(self._prefix, self._team, stream, part)

    def _joined(self, key: ThreadKey) -> str:
        return joined_key(self._prefix, self._team, key)

    async def accept(self, work: Incoming | Change | Shortcut) -> Acceptance:
        """Queue a job for ``work`` if it concerns the bot and was not queued before: a message addressed
        to it or said in a thread it joined (which joins the thread), an edit or a deletion in a thread
        it joined, a deleted file (wherever the bot may keep it), a shortcut someone used (which joins
        nothing: the thread's people did not ask the bot in)."""
        stream = stream_of(work.key, work.dedup_key)
        if isinstance(work, Incoming):
            team, joined = work.key.team, self._joined(work.key)
            only_if_joined, joins = not work.addressed, True
        elif isinstance(work, Shortcut):
            team, joined = work.key.team, self._key(stream, "joined:none")
            only_if_joined, joins = False, False
        else:
            team, joins = work.team, False
            joined = self._joined(work.key) if work.key else self._key(stream, "joined:none")
            only_if_joined = work.key is not None
        marker = self._key(stream, f"seen:{team}:{work.dedup_key}")
        with redis_errors("queueing a job"):
            outcome, *job_id = await self._accept(
                keys=[marker, self.queue_keys[stream], joined],
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
                self._key(0, f"shortcut:{shortcut.id}"), _encode(shortcut), ex=SHORTCUT_HELD_SECONDS
            )

    async def held(self, shortcut_id: str) -> Shortcut | None:
        """The shortcut ``hold`` kept under ``shortcut_id``; None once it expired."""
        with redis_errors("reading a shortcut"):
            raw = await self._redis.get(self._key(0, f"shortcut:{shortcut_id}"))
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
                await self._redis.set(self._key(0, f"refused:{channel}"), 1, nx=True, ex=REFUSED_SECONDS)
            )

    async def forget_refusal(self, channel: str) -> None:
        """The refusal could not be told: the next one is told again."""
        with redis_errors("unmarking a refusal"):
            await self._redis.delete(self._key(0, f"refused:{channel}"))

    async def join(self, key: ThreadKey) -> None:
        """Take part in a thread as if asked there: its follow-ups are queued without a mention."""
        with redis_errors("joining a thread"):
            await self._redis.set(self._joined(key), 1, ex=self._joined_seconds)

    async def ensure_group(self, stream: int) -> None:
        """Create the consumer group (and the stream) if missing; jobs queued before it are kept."""
        with redis_errors("creating the workers' consumer group"):
            try:
                await self._redis.xgroup_create(self.queue_keys[stream], GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def take(self, stream: int, count: int, block_ms: int) -> list[Job]:
        """Up to ``count`` new jobs of one stream, waiting up to ``block_ms`` for the first. (One stream
        per read: on a cluster the streams live in different slots, so one XREADGROUP cannot read them
        all; a worker runs one reader per stream.)"""
        with redis_errors("reading jobs"):
            try:
                response: Any = await self._redis.xreadgroup(
                    GROUP, self.consumer, {self.queue_keys[stream]: ">"}, count=count, block=block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group(stream)  # Redis lost the group (restarted without persistence)
                return []
        return [
            _decode(job_id, fields, 1, stream) for _, entries in response or [] for job_id, fields in entries
        ]

    async def reclaim(self, count: int) -> list[Job]:
        """Up to ``count`` jobs whose worker went silent for a whole lease, now this consumer's."""
        idle_ms = int(self.lease_seconds * 1000)
        jobs: list[Job] = []
        with redis_errors("reclaiming jobs"):
            for stream in self.streams:
                if len(jobs) >= count:
                    break
                try:
                    claimed = await self._reclaim(
                        keys=[self.queue_keys[stream]],
                        args=[GROUP, self.consumer, idle_ms, count - len(jobs)],
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self.ensure_group(stream)  # Redis lost the group (restarted without persistence)
                    continue
                jobs += [
                    _decode(job_id, fields, deliveries, stream) for job_id, fields, deliveries in claimed
                ]
        return jobs

    async def renew(self, jobs: Iterable[Job]) -> set[JobRef]:
        """Extend this consumer's lease on ``jobs``; the ones it lost to another worker."""
        by_stream: dict[int, list[str]] = {}
        for job in jobs:
            by_stream.setdefault(job.stream, []).append(job.id)
        lost: set[JobRef] = set()
        with redis_errors("renewing job leases"):
            for stream, ids in by_stream.items():
                gone = await self._renew(keys=[self.queue_keys[stream]], args=[GROUP, self.consumer, *ids])
                lost.update((stream, str(job_id)) for job_id in gone)
        return lost

    async def ack(self, job: Job) -> None:
        """The job is done: off the consumer's list and out of the stream."""
        queue = self.queue_keys[job.stream]
        with redis_errors("acknowledging a job"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(queue, GROUP, job.id)
                pipe.xdel(queue, job.id)
                await pipe.execute()

    async def dead_letter(self, job: Job, reason: str) -> None:
        """Move a job that failed every attempt to its stream's dead letters, in one step."""
        queue = self.queue_keys[job.stream]
        fields = {
            "job": _encode(job.work),
            "at": repr(job.enqueued_at),
            "id": job.id,
            "attempts": job.attempt - 1,
            "reason": reason,
        }
        with redis_errors("dead-lettering a job"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_keys[job.stream], fields, maxlen=DEAD_LETTERS_KEPT, approximate=True)  # type: ignore[arg-type]
                pipe.xack(queue, GROUP, job.id)
                pipe.xdel(queue, job.id)
                await pipe.execute()

    async def forget_person(self, user: str) -> int:
        """``/forget me``: the person's dead-lettered jobs and shortcuts waiting for their modal go. How
        many. (A job still queued is answered, and its turn then goes with the next ``/forget me``.)"""
        gone = 0
        with redis_errors("forgetting a person's jobs"):
            for dead in self.dead_keys:
                entries: Any = await self._redis.xrange(dead)
                mine = [entry_id for entry_id, fields in entries if _job_user(fields.get("job", "")) == user]
                if mine:
                    gone += await self._redis.xdel(dead, *mine)
            for key in await keys_matching(self._redis, glob_escape(self._key(0, "shortcut:")) + "*"):
                raw = await self._redis.get(key)
                if raw is not None and _job_user(raw) == user:
                    gone += await self._redis.delete(key)
        return gone

    async def depth(self) -> tuple[int, int]:
        """(jobs in the streams, of which being worked on): waiting = the first minus the second."""
        with redis_errors("measuring the queue"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for queue in self.queue_keys:
                    pipe.xlen(queue)
                    pipe.xpending(queue, GROUP)
                replies = await pipe.execute(raise_on_error=False)
        lengths, pendings = replies[::2], replies[1::2]
        for reply in lengths:
            if isinstance(reply, Exception):
                raise HistoryError(f"Redis failed while measuring the queue: {reply}")
        # A stream without its group yet has nothing being worked on.
        taken = sum(int(p["pending"]) for p in pendings if not isinstance(p, Exception))
        return sum(int(n) for n in lengths), taken

    async def dead_letters(self, count: int = 100) -> Sequence[Job]:
        """The newest dead-lettered jobs of every stream (for operators and tests), newest first."""
        jobs: list[Job] = []
        with redis_errors("reading dead letters"):
            for stream, dead in enumerate(self.dead_keys):
                entries: Any = await self._redis.xrevrange(dead, count=count)
                jobs += [
                    _decode(str(fields["id"]), fields, int(fields["attempts"]), stream)
                    for _, fields in entries
                ]
        return sorted(jobs, key=lambda job: job.enqueued_at, reverse=True)[:count]
