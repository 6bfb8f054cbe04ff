"""RedisHistory on real Redis: keys, TTLs, caps, paged reads, recounts, the thread lock, job progress."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from bot.domain import JobProgress, ThreadKey, Turn
from bot.errors import ThreadBusy
from bot.history import PROGRESS_SECONDS, RedisHistory
from bot.tokens import TiktokenCounter

KEY = ThreadKey("T9", "C9", "1700000000.000001")


# Every test here runs on the single server and on the Redis Cluster.
pytestmark = pytest.mark.cluster


def turn(counter: TiktokenCounter, i: int, encoding: str = "o200k_base") -> Turn:
    text = f"turn {i}"
    return Turn("user", text, counter.message_tokens("user", text), encoding, ts=str(i))


async def test_turns_live_under_the_workspace_with_a_ttl_and_a_cap(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix, ttl_seconds=600, max_turns=5)
    assert not (await history.recall(KEY, 10**6)).remembered
    await history.seed(KEY, [turn(counter, i) for i in range(8)])
    keys = sorted([k async for k in redis_client.scan_iter(match=f"{prefix}*")])
    assert keys == [f"{prefix}{{T9:C9:1700000000.000001}}:turns"]
    assert 590 < await redis_client.ttl(keys[0]) <= 600
    stored = await history.recall(KEY, 10**6)
    # capped: the first message and the newest
    assert stored.first is not None and stored.first.text == "turn 0"
    assert [t.text for t in stored.turns] == [f"turn {i}" for i in (7, 6, 5, 4)]
    assert stored.remembered


async def test_a_thread_whose_turns_expired_before_its_memory_is_still_remembered(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    await redis_client.hset(f"{prefix}{{T9:C9:1700000000.000001}}:memory", "noted", "1")
    recall = await history.recall(KEY, 10**6)
    assert recall.turns == () and recall.first is None
    assert recall.remembered


async def test_recent_reads_only_what_the_budget_can_use(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    await history.seed(KEY, [turn(counter, i) for i in range(10_000)])
    per_turn = turn(counter, 9999).tokens
    recent = (await history.recall(KEY, 50 * per_turn)).turns
    assert len(recent) == 51  # what fits, plus the one that tells build_context to stop
    assert recent[0].text == "turn 9999" and recent[-1].text == "turn 9949"


async def test_turns_counted_with_another_encoding_are_recounted_once_and_rewritten(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    old = Turn("assistant", "bonjour " * 50, 1, "cl100k_base")
    await history.seed(KEY, [old])
    recounted = (await history.recall(KEY, 10**6)).first
    assert recounted is not None
    assert recounted.encoding == "o200k_base"
    assert recounted.tokens == counter.message_tokens("assistant", "bonjour " * 50)
    turns_key = f"{prefix}{{T9:C9:1700000000.000001}}:turns"
    # Kept while the reply goes on, not before it: wait for it.
    for _ in range(100):
        raw = await redis_client.lindex(turns_key, 0)
        if raw is not None and json.loads(raw)["enc"] == "o200k_base":
            break
        await asyncio.sleep(0.01)
    assert raw is not None and json.loads(raw)["enc"] == "o200k_base"
    assert json.loads(raw)["tokens"] == recounted.tokens


async def test_a_count_is_not_kept_over_a_turn_that_changed_since_it_was_read(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    turns_key = f"{prefix}{{T9:C9:1700000000.000001}}:turns"
    await history.seed(
        KEY, [Turn("user", "first", 1, "cl100k_base"), Turn("user", "second", 1, "cl100k_base")]
    )
    read = [str(raw) for raw in await redis_client.lrange(turns_key, 0, -1)]
    await redis_client.lset(turns_key, 1, "changed meanwhile")
    counted = Turn("user", "x", 9, "o200k_base")
    await history._keep_counts(turns_key, {0: (read[0], counted), 1: (read[1], counted)})
    kept = await redis_client.lrange(turns_key, 0, -1)
    assert json.loads(kept[0])["tokens"] == 9 and kept[1] == "changed meanwhile"


async def test_a_jobs_question_and_answer_are_stored_once_however_often_it_is_tried(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    question = turn(counter, 1)
    answer = Turn("assistant", "an answer", counter.message_tokens("assistant", "an answer"), "o200k_base")
    assert await history.progress(KEY, "1-0") == JobProgress()
    for _ in range(2):  # a job tried twice
        await history.store_question(KEY, "1-0", question)
        await history.record_part(KEY, "1-0", 0, "1700000000.000100")
    await history.record_part(KEY, "1-0", 1, "1700000000.000200")
    await history.store_answer(KEY, "1-0", answer)
    await history.store_answer(KEY, "1-0", answer)
    stored = await history.recall(KEY, 10**6)
    assert stored.first == question and [t.text for t in stored.turns] == ["an answer"]
    assert await history.progress(KEY, "1-0") == JobProgress(
        question_stored=True, answered=True, parts=("1700000000.000100", "1700000000.000200")
    )
    progress_key = f"{prefix}{{T9:C9:1700000000.000001}}:job:1-0"
    assert 0 < await redis_client.ttl(progress_key) <= PROGRESS_SECONDS
    assert await history.progress(KEY, "2-0") == JobProgress()  # another job of the thread
    await history.forget_job(KEY, "1-0")
    assert await redis_client.exists(progress_key) == 0


async def test_a_dead_holders_thread_lock_frees_itself_within_one_lease(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix, lock_lease_seconds=2)
    held = history.lock(KEY)
    await held.__aenter__()
    lock_key = f"{prefix}{{T9:C9:1700000000.000001}}:lock"
    await asyncio.sleep(1.5)  # renewed meanwhile (every third of the lease)
    assert 1000 < await redis_client.pttl(lock_key) <= 2000
    for task in asyncio.all_tasks():  # the holder dies: nothing renews the lease any more
        if task.get_coro().__qualname__.startswith("RedisHistory._renew"):  # type: ignore[union-attr]
            task.cancel()
    async with asyncio.timeout(3):
        async with history.lock(KEY):
            pass
    await held.__aexit__(None, None, None)


async def test_the_thread_lock_serialises_holders_and_is_released(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    order: list[str] = []

    async def hold(name: str) -> None:
        async with history.lock(KEY):
            order.append(f"{name} in")
            await asyncio.sleep(0.1)
            order.append(f"{name} out")

    await asyncio.gather(hold("a"), hold("b"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    assert await redis_client.exists(f"{prefix}{{T9:C9:1700000000.000001}}:lock") == 0


async def test_storing_the_answer_lets_the_thread_go_in_the_same_step_and_only_the_lock_it_holds(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix, lock_lease_seconds=2)
    lock_key = f"{prefix}{{T9:C9:1700000000.000001}}:lock"
    answer = Turn("assistant", "an answer", counter.message_tokens("assistant", "an answer"), "o200k_base")
    async with history.lock(KEY) as hold:
        await history.store_answer(KEY, "1-0", answer, releasing=hold)
        assert await redis_client.exists(lock_key) == 0
        async with asyncio.timeout(1), history.lock(KEY):  # a follow-up takes the thread at once
            follow_up_token = await redis_client.get(lock_key)
    assert await redis_client.exists(lock_key) == 0

    async with history.lock(KEY) as hold:
        await redis_client.set(lock_key, "another holder's token", px=10_000)  # this lease ran out meanwhile
        await history.store_answer(KEY, "2-0", answer, releasing=hold)
        assert await redis_client.get(lock_key) == "another holder's token"
    assert await redis_client.get(lock_key) == "another holder's token"  # leaving the block leaves it too
    assert follow_up_token
    stored = await history.recall(KEY, 10**6)  # both answers: the first is the thread's first turn
    assert (
        stored.first is not None and [stored.first.text, *(t.text for t in stored.turns)] == ["an answer"] * 2
    )

    await redis_client.delete(lock_key)
    async with history.lock(KEY):
        await history.store_answer(KEY, "3-0", answer)  # without the hold, the thread stays held
        assert await redis_client.exists(lock_key) == 1
    assert await redis_client.exists(lock_key) == 0


async def test_a_reply_waiting_for_its_thread_tries_again_within_milliseconds_then_every_10_ms_then_gives_up(
    redis_client: redis.Redis, redis_url: str, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix, lock_wait_seconds=0.3)
    lock_key = f"{prefix}{{T9:C9:1700000000.000001}}:lock"
    done_key = f"{prefix}{{T9:C9:1700000000.000001}}:done"  # on the lock's node of a cluster
    await redis_client.set(lock_key, "another reply's token", px=10_000)
    if isinstance(redis_client, RedisCluster):
        node = redis_client.get_node_from_key(lock_key)
        redis_url = f"redis://{node.host}:{node.port}"
    tries: list[float] = []  # when the server saw each try, by its own clock
    watching, seen_all = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        async with redis.Redis.from_url(redis_url).monitor() as monitor:
            watching.set()
            async for command in monitor.listen():
                if command["command"].startswith(f"SET {lock_key} "):
                    tries.append(float(command["time"]))
                elif done_key in command["command"]:
                    seen_all.set()

    watcher = asyncio.create_task(watch())
    await watching.wait()
    with pytest.raises(ThreadBusy):
        async with history.lock(KEY):
            pass
    await redis_client.get(done_key)
    await asyncio.wait_for(seen_all.wait(), 5)
    watcher.cancel()

    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    # A follow-up usually finds its thread a round trip or two from release: the first retry comes
    # after a millisecond, not the 10 ms a held thread is then polled at. The first three retries
    # come 1, 2 and 4 ms apart (7 ms), where polling every 10 ms takes 30: a margin for a busy machine.
    assert sum(gaps[:3]) < 0.02
    assert min(gaps[5:]) >= 0.008
    assert 20 <= len(tries) <= 40  # 0.3 s of a held thread
    assert await redis_client.get(lock_key) == "another reply's token"  # untouched by the waiter


async def test_an_edit_rewrites_and_recounts_the_turn_and_resets_a_summary_that_covered_it(
    redis_client: redis.Redis, prefix: str, counter: TiktokenCounter
) -> None:
    history = RedisHistory(redis_client, counter, prefix=prefix)
    await history.seed(KEY, [turn(counter, i) for i in range(10)])
    assert await history.save_summary(KEY, await history.summary(KEY), 6, "turns 1 to 5, summarized")

    assert await history.edit_message(KEY, "8", "turn eight, edited at length")  # after the summary
    assert (await history.summary(KEY)).text == "turns 1 to 5, summarized"
    [edited] = [t for t in (await history.recall(KEY, 10**6)).turns if t.ts == "8"]
    assert edited.text == "turn eight, edited at length"
    assert edited.tokens == counter.message_tokens("user", "turn eight, edited at length")

    generation = (await history.summary(KEY)).generation
    assert await history.edit_message(KEY, "3", "turn three, edited")  # one the summary covered
    summary = await history.summary(KEY)
    assert (summary.text, summary.until) == ("", 1)
    assert summary.generation != generation  # a summary being written from the old one is dropped
    assert not await history.edit_message(KEY, "99", "never stored")
