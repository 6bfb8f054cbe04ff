"""The worker: takes jobs from the queue and answers them; any number of them share one Redis.

A worker runs up to ``WORKER_CONCURRENCY`` jobs at once. New jobs come from the consumer group, one
reader per job stream, each asking for its share of the room left; jobs that arrive on several
streams at once beyond the room wait here, taken and leased, until a running job ends. Every quarter
lease it also reclaims jobs whose worker went silent for a whole lease (it died, or froze).
While a job runs, one loop renews the leases of all of this worker's jobs; a job whose lease another
worker took meanwhile is cancelled here, so two workers never write the same answer.

This module is the worker's last-resort handler. A job that raises (Redis unreachable, Slack failing
after its retries, a bug) is logged with its traceback and left unacknowledged: its lease runs out and
it is tried again, by any worker, from where it stopped. Users are told nothing of a failed attempt;
a job that fails every attempt is moved to the dead letters and its thread gets one fixed apology.
Stopping, a worker takes no new jobs and lets the running ones finish for a grace period; jobs still
running after it are dropped unacknowledged, for another worker to take over.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from bot.conversation import Responder
from bot.domain import Change, Job, JobRef, Shortcut
from bot.errors import BotError, HistoryError
from bot.forgetting import Forgetting
from bot.history import RedisHistory
from bot.jobs import JobQueue
from bot.observability import (
    JOBS_DEAD_LETTERED,
    JOBS_DONE,
    JOBS_FAILED,
    JOBS_IN_FLIGHT,
    JOBS_RECLAIMED,
    JOBS_WAITING,
    QUEUE_WAIT,
    REPLY_DURATION,
    job_context,
)
from bot.places import Places

log = logging.getLogger(__name__)

APOLOGY = "Sorry, I couldn't answer this, even after several tries. Please ask again in a little while."
SHUTDOWN_GRACE_SECONDS = 30.0
READ_BLOCK_MS = 250  # how long one read waits for new jobs; also how soon a stop is noticed
MAX_BACKOFF_SECONDS = 5.0


class Worker:
    """Answers jobs from one queue with one responder."""

    def __init__(
        self,
        queue: JobQueue,
        responder: Responder,
        history: RedisHistory,
        forgetting: Forgetting,
        *,
        concurrency: int,
        places: Places | None = None,
    ) -> None:
        self._queue = queue
        self._places = places  # where the bot answers; None: everywhere
        self._responder = responder
        self._history = history
        self._forgetting = forgetting
        self._concurrency = concurrency
        self._jobs: dict[JobRef, Job] = {}  # running or waiting: this worker holds their leases
        self._running: dict[JobRef, asyncio.Task[None]] = {}
        self._waiting: collections.deque[Job] = collections.deque()  # taken beyond the room, next to run
        self._finishing: set[JobRef] = set()  # running jobs that are acknowledged or being dead-lettered
        self._room = asyncio.Event()  # set when room frees (or the worker stops): readers look again
        self._last_read = float("-inf")

    def consuming(self) -> bool:
        """True while the worker reads the queue (for readiness)."""
        return time.monotonic() - self._last_read < max(10.0, self._queue.lease_seconds)

    def _room_left(self) -> int:
        return self._concurrency - len(self._running) - len(self._waiting)

    def _make_room(self) -> None:
        # Wakes the readers waiting for room only when there is some: a job ending in a full worker
        # whose readers have all asked already wakes nobody.
        if self._room_left() > 0:
            self._room.set()

    async def run(self, stop: asyncio.Event, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Answer jobs until ``stop`` is set, then let running ones finish for ``grace_seconds``."""
        renewal = asyncio.create_task(self._renew_leases())
        try:
            await self._consume(stop)
        finally:
            for job in self._waiting:  # unstarted: another worker takes them over after one lease
                self._jobs.pop(job.ref, None)
            self._waiting.clear()
            if self._running:
                await asyncio.wait(set(self._running.values()), timeout=grace_seconds)
            for task in list(self._running.values()):
                task.cancel()  # unacknowledged: another worker takes it over after one lease
            renewal.cancel()

    async def _consume(self, stop: asyncio.Event) -> None:
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._room.set())
        try:
            async with asyncio.TaskGroup() as readers:  # one failing stops the others
                readers.create_task(self._reclaim_now_and_then(stop, stopping))
                for stream in self._queue.streams:
                    readers.create_task(self._read(stream, stop, stopping))
        finally:
            stopping.cancel()

    async def _read(self, stream: int, stop: asyncio.Event, stopping: asyncio.Task[bool]) -> None:
        """New jobs of one stream, as many as this stream's share of the room left (at least one: no
        stream waits for another's read to end, so the readers may together bring a few more jobs than
        the room, which then wait here)."""
        delay = 0.1
        group_ready = False
        share = len(self._queue.streams)
        while not stop.is_set():
            room = self._room_left()
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                if not group_ready:
                    await self._queue.ensure_group(stream)
                    group_ready = True
                jobs = await self._queue.take(stream, -(-room // share), READ_BLOCK_MS)
                self._last_read = time.monotonic()
                delay = 0.1
            except HistoryError as exc:
                log.warning("cannot read jobs of stream %d (%s); trying again in %.1f s", stream, exc, delay)
                await asyncio.wait({stopping}, timeout=delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            for job in jobs:
                self._start(job)

    async def _reclaim_now_and_then(self, stop: asyncio.Event, stopping: asyncio.Task[bool]) -> None:
        """Every quarter lease: the jobs of silent workers, and the queue's depth for the metrics."""
        while not stop.is_set():
            try:
                if (room := self._room_left()) > 0:
                    jobs = await self._queue.reclaim(room)
                    JOBS_RECLAIMED.inc(len(jobs))
                    for job in jobs:
                        self._start(job)
                queued, taken = await self._queue.depth()
                JOBS_WAITING.set(queued - taken)
            except HistoryError as exc:
                log.warning("cannot reclaim jobs (%s); trying again in a while", exc)
            await asyncio.wait({stopping}, timeout=self._queue.lease_seconds / 4)

    def _start(self, job: Job) -> None:
        if job.ref in self._jobs:
            return  # reclaimed from this very worker while it still holds it
        self._jobs[job.ref] = job
        if len(self._running) >= self._concurrency:
            self._waiting.append(job)
        else:
            self._launch(job)

    def _launch(self, job: Job) -> None:
        work = self._give_up(job) if job.attempt > self._queue.max_attempts else self._work(job)
        task = asyncio.create_task(work)
        self._running[job.ref] = task

        def ended(_: asyncio.Task[None]) -> None:
            self._running.pop(job.ref, None)
            self._jobs.pop(job.ref, None)
            self._finishing.discard(job.ref)
            if self._waiting:
                self._launch(self._waiting.popleft())
            self._make_room()

        task.add_done_callback(ended)

    async def _work(self, job: Job) -> None:
        with job_context(job.label, job.id):
            started = time.monotonic()
            waited = max(0.0, time.time() - job.enqueued_at)
            QUEUE_WAIT.observe(waited)
            log.info("job started: attempt %d, %.1f ms in the queue", job.attempt, waited * 1000)
            JOBS_IN_FLIGHT.inc()
            try:
                if isinstance(job.work, Change):
                    await self._forgetting.carry_out(job.work)
                elif self._places and (refusal := await self._places.refusal(job.incoming.key.channel)):
                    await self._refuse(job, refusal)
                elif isinstance(job.work, Shortcut):
                    await self._responder.respond_to_shortcut(job)
                else:
                    await self._responder.respond(job)
            except BotError as exc:
                JOBS_FAILED.inc()
                log.warning("job attempt %d failed, to be tried again: %s", job.attempt, exc)
                return
            except Exception:
                JOBS_FAILED.inc()
                log.exception("job attempt %d failed unexpectedly, to be tried again", job.attempt)
                return
            finally:
                JOBS_IN_FLIGHT.dec()
            await self._finish(job)
            REPLY_DURATION.observe(time.monotonic() - started)
            log.info("job done in %.1f ms", (time.monotonic() - started) * 1000)

    async def _refuse(self, job: Job, refusal: str) -> None:
        """A question where the bot does not answer: it keeps nothing of the thread and tells where it
        can be used, to a shortcut's user each time, in a conversation once a day (not to every
        follow-up of a crowd that keeps mentioning it)."""
        if isinstance(job.work, Shortcut):
            await self._responder.notice(job, refusal)
            return
        key = job.incoming.key
        await self._queue.leave(key)
        if not await self._queue.first_refusal(key.channel):
            return
        try:
            await self._responder.notice(job, refusal)
        except BaseException:
            await self._queue.forget_refusal(key.channel)  # the retry tells it
            raise

    async def _finish(self, job: Job) -> None:
        self._finishing.add(job.ref)
        try:
            await self._queue.ack(job)
            JOBS_DONE.inc()
            if not isinstance(job.work, Change):
                await self._history.forget_job(job.work.key, job.id)
        except HistoryError as exc:
            # Retried later, the job finds itself answered and is only acknowledged.
            log.warning("could not acknowledge a finished job: %s", exc)

    async def _give_up(self, job: Job) -> None:
        self._finishing.add(job.ref)
        with job_context(job.label, job.id):
            try:
                await self._queue.dead_letter(job, f"failed {job.attempt - 1} attempts")
            except HistoryError as exc:
                log.warning("could not dead-letter a job, to be tried again: %s", exc)
                return
            JOBS_DEAD_LETTERED.inc()
            log.error("job failed %d attempts; moved to the dead letters", job.attempt - 1)
            if isinstance(job.work, Change):
                return  # nobody waits for an answer
            try:
                await self._responder.notice(job, APOLOGY)
                await self._history.forget_job(job.work.key, job.id)
            except Exception as exc:  # Slack or Redis may be what keeps failing; the log is all there is
                log.warning("could not apologise in the thread: %s", type(exc).__name__)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self._queue.lease_seconds / 3)
            try:
                lost = await self._queue.renew(
                    j for ref, j in self._jobs.items() if ref not in self._finishing
                )
            except HistoryError as exc:
                log.warning("could not renew job leases: %s", exc)
                continue
            for ref in lost - self._finishing:  # (one may have finished while the renewal ran)
                if (task := self._running.get(ref)) is not None:
                    log.warning("job %s was taken over by another worker; stopping here", ref[1])
                    task.cancel()
                elif (job := self._jobs.pop(ref, None)) is not None:
                    self._waiting.remove(job)
