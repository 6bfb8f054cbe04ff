"""The job queue on a real Redis: queued once per message, leases, reclaiming, dead letters."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from bot.domain import Incoming, ThreadKey
from bot.jobs import DEDUP_SECONDS, GROUP, JOB_STREAMS, Acceptance, JobQueue, stream_of

# Every test here runs on the single server and on the Redis Cluster.
pytestmark = pytest.mark.cluster


def message(
    ts: str = "1700000000.000100",
    channel: str = "C9",
    team: str = "T9",
    thread_ts: str | None = None,
    addressed: bool = True,
) -> Incoming:
    key = ThreadKey(team, channel, thread_ts or ts)
    return Incoming(key, ts, "U1", "<@UBOT> hello", addressed=addressed, is_dm=False)


async def enqueue(queue: JobQueue, incoming: Incoming) -> str:
    acceptance = await queue.accept(incoming)
    assert acceptance.outcome == "queued" and acceptance.job_id is not None
    return acceptance.job_id


def queue(client: redis.Redis, prefix: str, consumer: str, lease: float = 1.0) -> JobQueue:
    return JobQueue(client, prefix=prefix, team="T9", lease_seconds=lease, max_attempts=3, consumer=consumer)


async def test_a_message_is_queued_once_whoever_delivers_it(redis_client: redis.Redis, prefix: str) -> None:
    first, second = queue(redis_client, prefix, "a"), queue(redis_client, prefix, "b")
    job_id = await enqueue(first, message())
    assert await first.accept(message()) == Acceptance("duplicate")  # Slack's retry
    assert await second.accept(message()) == Acceptance("duplicate")  # another ingress replica
    await enqueue(first, message(team="T8"))  # the same ids in another workspace
    stream = stream_of(message().key)
    assert await redis_client.xlen(first.queue_keys[stream]) == 2
    tag = "T9:jobs" if stream == 0 else f"T9:jobs:{stream}"
    marker = f"{prefix}{{{tag}}}:seen:T9:C9:1700000000.000100"
    assert await redis_client.get(marker) == job_id
    assert 0 < await redis_client.ttl(marker) <= DEDUP_SECONDS


async def test_the_bot_takes_part_in_a_thread_from_the_question_it_accepts_there(
    redis_client: redis.Redis, prefix: str
) -> None:
    ingress = JobQueue(
        redis_client, prefix=prefix, team="T9", lease_seconds=1, max_attempts=3, joined_seconds=600
    )
    chatter = message("1.2", thread_ts="1.1", addressed=False)
    assert await ingress.accept(chatter) == Acceptance("ignored")  # people talking among themselves
    await enqueue(ingress, message("1.3", thread_ts="1.1"))  # the bot is asked in the thread
    await enqueue(ingress, message("1.4", thread_ts="1.1", addressed=False))  # now follow-ups count
    assert await ingress.accept(message("2.2", thread_ts="2.1", addressed=False)) == Acceptance("ignored")
    stream = stream_of(ThreadKey("T9", "C9", "1.1"))
    tag = "T9:jobs" if stream == 0 else f"T9:jobs:{stream}"
    joined = f"{prefix}{{{tag}}}:joined:T9:C9:1.1"
    assert 590 < await redis_client.ttl(joined) <= 600
    await ingress.join(ThreadKey("T9", "C9", "2.1"))
    await enqueue(ingress, message("2.2", thread_ts="2.1", addressed=False))


async def test_jobs_queued_before_any_worker_are_taken_with_what_was_asked(
    redis_client: redis.Redis, prefix: str
) -> None:
    ingress, worker = queue(redis_client, prefix, "ingress"), queue(redis_client, prefix, "w1")
    job_id = await enqueue(ingress, message())
    stream = stream_of(message().key)
    await worker.ensure_group(stream)
    await worker.ensure_group(stream)  # idempotent
    (job,) = await worker.take(stream, 10, block_ms=100)
    assert (job.id, job.incoming, job.attempt, job.stream) == (job_id, message(), 1, stream)
    assert job.enqueued_at > 0
    assert await worker.take(stream, 10, block_ms=50) == []  # nobody else gets it
    await worker.ack(job)
    assert await worker.depth() == (0, 0)


async def test_a_silent_workers_job_is_reclaimed_after_its_lease_and_a_renewed_one_is_not(
    redis_client: redis.Redis, prefix: str
) -> None:
    dying, living, other = (queue(redis_client, prefix, name) for name in ("dying", "living", "other"))
    for stream in dying.streams:
        await dying.ensure_group(stream)
    await enqueue(dying, message("1.1"))
    await enqueue(living, message("1.2"))
    (abandoned,) = await dying.take(stream_of(message("1.1").key), 1, block_ms=100)
    (kept,) = await living.take(stream_of(message("1.2").key), 1, block_ms=100)
    assert await other.reclaim(10) == []  # both leases still run
    for _ in range(4):
        await asyncio.sleep(0.4)
        assert await living.renew([kept]) == set()
    (reclaimed,) = await other.reclaim(10)
    assert (reclaimed.id, reclaimed.attempt, reclaimed.incoming) == (abandoned.id, 2, abandoned.incoming)
    # The worker that went silent finds out it lost the job when it next renews.
    assert await dying.renew([abandoned]) == {abandoned.ref}
    assert await other.depth() == (2, 2)


async def test_a_job_delivered_past_its_attempts_goes_to_the_dead_letters(
    redis_client: redis.Redis, prefix: str
) -> None:
    workers = [queue(redis_client, prefix, f"w{i}", lease=0.2) for i in range(4)]
    stream = stream_of(message().key)
    await workers[0].ensure_group(stream)
    await enqueue(workers[0], message())
    (job,) = await workers[0].take(stream, 1, block_ms=100)
    for worker in workers[1:]:
        await asyncio.sleep(0.3)
        (job,) = await worker.reclaim(1)
    assert job.attempt == 4 > workers[-1].max_attempts
    await workers[-1].dead_letter(job, "failed 3 attempts")
    assert await workers[-1].depth() == (0, 0)
    (dead,) = await workers[-1].dead_letters()
    assert (dead.id, dead.incoming, dead.attempt) == (job.id, job.incoming, 3)
    pending = await redis_client.xpending(workers[0].queue_keys[stream], GROUP)
    assert pending["pending"] == 0


async def test_a_lost_consumer_group_is_made_again(redis_client: redis.Redis, prefix: str) -> None:
    worker = queue(redis_client, prefix, "w1")
    stream = stream_of(message().key)
    await worker.ensure_group(stream)
    await redis_client.delete(worker.queue_keys[stream])  # Redis restarted without its data
    assert await worker.take(stream, 1, block_ms=50) == []
    assert await worker.reclaim(1) == []
    await enqueue(worker, message())
    (job,) = await worker.take(stream, 1, block_ms=100)
    assert job.incoming == message()


async def test_threads_spread_over_the_streams_and_a_threads_jobs_stay_in_one(
    redis_client: redis.Redis, prefix: str
) -> None:
    ingress = queue(redis_client, prefix, "ingress")
    for n in range(40):
        await enqueue(ingress, message(f"1700000000.{n:06d}"))  # 40 threads
        await enqueue(ingress, message(f"1700000001.{n:06d}", thread_ts=f"1700000000.{n:06d}"))  # a follow-up
    lengths = [await redis_client.xlen(key) for key in ingress.queue_keys]
    assert len(lengths) == JOB_STREAMS and sum(lengths) == 80
    assert sum(1 for n in lengths if n) >= JOB_STREAMS - 1  # spread, not one hot stream
    for stream, key in enumerate(ingress.queue_keys):
        entries: Any = await redis_client.xrange(key)
        threads = [orjson.loads(fields["job"])["thread_ts"] for _, fields in entries]
        assert all(stream_of(ThreadKey("T9", "C9", ts)) == stream for ts in threads)
        assert all(threads.count(ts) == 2 for ts in threads)  # a question and its follow-up together
    assert await ingress.depth() == (80, 0)
