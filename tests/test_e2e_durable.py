"""End to end, durable replies: every acknowledged question answered exactly once, whatever fails.

Real processes and real faults: worker processes killed with SIGKILL, a private ``redis-server`` stopped
and started again, the fake Slack answering 500 or 429, the fake model streaming slowly so a worker
dies mid-answer. Each test asserts what the thread shows and what Redis holds afterwards.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from bot.domain import Incoming, Job, ThreadKey
from bot.jobs import stream_of
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_ID, BOT_USER_ID, TEAM_ID
from tests.procs import BotProcess, PrivateRedis

FINISHED = ("done", "failed", "notice")


def state(message: dict[str, Any]) -> str:
    return str(((message.get("metadata") or {}).get("event_payload") or {}).get("state", ""))


def finished(harness: Harness, channel: str, ts: str) -> list[str]:
    """The texts of the bot's messages in a thread, once every one of them is finished; else []."""
    messages = harness.slack.bot_messages(channel, ts)
    return [m["text"] for m in messages] if all(state(m) in (*FINISHED, "more") for m in messages) else []


async def stored_texts(client: redis.Redis, prefix: str, channel: str, ts: str) -> list[str]:
    raw = await client.lrange(f"{prefix}{{{TEAM_ID}:{channel}:{ts}}}:turns", 0, -1)
    return [orjson.loads(item)["text"] for item in raw]


@pytest.mark.cluster
async def test_a_worker_killed_mid_reply_is_replaced_and_the_thread_ends_with_one_answer(
    harness: Harness, tmp_path: Path
) -> None:
    harness.model.script(
        Reply(chunks=[f"half{i} " for i in range(100)], chunk_delay=0.1),  # the answer the kill cuts off
        Reply(text="The complete answer."),
        Reply(text="Another answer."),
    )
    env = harness.env(JOB_LEASE_SECONDS="2")
    async with harness.running(workers=0, job_lease_seconds=2):  # the ingress alone
        doomed = await BotProcess(env, "worker", cwd=tmp_path).start()
        ts = await harness.say("a long question")
        await harness.slack.wait_for(
            lambda: any("half3" in m["text"] for m in harness.slack.bot_messages("C1", ts)),
            30,
            "half a reply",
        )
        doomed.signal(signal.SIGKILL)
        await doomed.wait()
        # The dead worker's thread lock runs out within one short lease, renewed no more.
        assert 0 < await harness.redis.pttl(f"{harness.prefix}{{{TEAM_ID}:C1:{ts}}}:lock") <= 2000
        successor = await BotProcess(env, "worker", cwd=tmp_path).start()
        try:
            await harness.slack.wait_for(
                lambda: finished(harness, "C1", ts) == ["The complete answer."], 30, "the answer, retried"
            )
            await harness.say("and then?", thread_ts=ts)  # the thread is free again
            await harness.slack.wait_for(lambda: len(finished(harness, "C1", ts)) == 2, 30, "a new answer")
        finally:
            await successor.stop()
    messages = harness.slack.bot_messages("C1", ts)
    assert [(m["text"], state(m)) for m in messages] == [
        ("The complete answer.", "done"),
        ("Another answer.", "done"),
    ]
    assert await stored_texts(harness.redis, harness.prefix, "C1", ts) == [
        "a long question",
        "The complete answer.",
        "and then?",
        "Another answer.",
    ]
    assert "job started: attempt 2" in successor.log()
    assert await harness.queued() == 0


async def test_redis_stopped_and_started_again_loses_nothing_and_says_nothing_twice(
    harness: Harness, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    harness.model.script(Reply(text="Before."), *(Reply(text=f"After {i}.") for i in range(2)))
    env = harness.env(REDIS_URL=server.url, JOB_LEASE_SECONDS="2")
    try:
        async with harness.running(workers=0, redis_url=server.url, job_lease_seconds=2):
            worker = await BotProcess(env, "worker", cwd=tmp_path).start()
            ts = await harness.say("before the outage")
            await harness.slack.wait_for(lambda: finished(harness, "C1", ts) == ["Before."], 20, "an answer")
            server.stop()
            acked_before = set(harness.slack.acks)
            refused = REGISTRY.get_sample_value("sgb_events_refused_total") or 0
            follow_up = await harness.say("also this", mention=False, thread_ts=ts, acked=False)
            other = await harness.say("a new question", channel="C2", acked=False)
            await harness.slack.wait_for(  # the ingress gives up on Redis after a few retries ...
                lambda: REGISTRY.get_sample_value("sgb_events_refused_total") == refused + 2, 10, "refusals"
            )
            # ... and so does the worker process, which waits on.
            await harness.slack.wait_for(lambda: "cannot read jobs" in worker.log(), 15, "the worker's wait")
            assert set(harness.slack.acks) == acked_before  # neither was acknowledged ...
            assert len(harness.slack.bot_messages("C1", ts)) == 1  # ... nor answered, nor apologised for
            server.start()
            for envelope in await harness.slack.redeliver_unacked():
                await harness.slack.wait_ack(envelope, timeout=20)
            await harness.slack.wait_for(
                lambda: len(finished(harness, "C1", ts)) == 2 and len(finished(harness, "C2", other)) == 1,
                30,
                "both answered",
            )
            assert worker.running  # it waited the outage out
            await worker.stop()
    finally:
        server.stop()
    texts = finished(harness, "C1", ts) + finished(harness, "C2", other)
    assert sorted(texts) == ["After 0.", "After 1.", "Before."]
    assert not any(":warning:" in c.args.get("markdown_text", "") for c in harness.slack.calls)
    assert follow_up in {m["ts"] for m in harness.slack.thread("C1", ts)}


@pytest.mark.parametrize(
    ("mode", "method", "after_processing"),
    [
        ("update", "chat.postMessage", False),
        ("native", "chat.startStream", False),
        ("update", "chat.postMessage", True),
        ("native", "chat.startStream", True),
        ("off", "chat.postMessage", True),
    ],
    ids=[
        "post-refused",
        "stream-refused",
        "post-failed-after-posting",
        "stream-failed-after-starting",
        "off",
    ],
)
@pytest.mark.parametrize("status", [500, 0], ids=["http-500", "connection-dropped"])
async def test_a_slack_failure_on_the_first_write_still_gives_exactly_one_complete_reply(
    harness: Harness, mode: str, method: str, after_processing: bool, status: int
) -> None:
    harness.slack.fail_http(method, status, after_processing=after_processing)
    harness.model.script(Reply(chunks=["The whole ", "answer."], chunk_delay=0.05))
    async with harness.running(stream_mode=mode):
        ts = await harness.say("hello")
        await harness.slack.wait_for(lambda: bool(finished(harness, "C1", ts)), 15, "the reply")
    messages = harness.slack.bot_messages("C1", ts)
    assert [(m["text"], state(m)) for m in messages] == [("The whole answer.", "done")]
    creates = len(harness.slack.calls_to(method))
    assert creates == (1 if after_processing else 2)  # found by its metadata instead of posted again


@pytest.mark.parametrize("status", [429, 500, 0], ids=["rate-limited", "http-500", "connection-dropped"])
async def test_edits_that_slack_refuses_for_a_while_are_tried_again(harness: Harness, status: int) -> None:
    harness.slack.fail_http("chat.update", status, times=2)
    harness.model.script(Reply(text="Patience pays."))
    async with harness.running(stream_mode="update"):
        ts = await harness.say("hello")
        await harness.slack.wait_for(lambda: bool(finished(harness, "C1", ts)), 15, "the reply")
    assert finished(harness, "C1", ts) == ["Patience pays."]
    assert len(harness.slack.calls_to("chat.update")) == 3  # two refused, then done


@pytest.mark.cluster
async def test_a_job_that_fails_every_attempt_is_dead_lettered_with_one_apology(harness: Harness) -> None:
    harness.slack.fail_http("chat.startStream", 500, times=100)  # Slack keeps failing this thread's writes
    async with harness.running(stream_mode="native", job_lease_seconds=2, job_max_attempts=2):
        ts = await harness.say("will this work?")
        await harness.slack.wait_for(lambda: bool(finished(harness, "C1", ts)), 40, "the apology")
        await harness.settled()  # nothing more comes
        dead_key = harness.queue().dead_keys[stream_of(ThreadKey(TEAM_ID, "C1", ts))]
        dead: Any = await harness.redis.xrange(dead_key)
    messages = harness.slack.bot_messages("C1", ts)
    assert [state(m) for m in messages] == ["notice"]
    assert "couldn't answer" in messages[0]["text"]
    assert len(harness.model.requests) == 2  # one model call per attempt
    [(_, fields)] = dead
    assert json.loads(fields["job"])["ts"] == ts
    assert (fields["attempts"], fields["reason"]) == ("2", "failed 2 attempts")
    assert await harness.queued() == 0


async def test_two_worker_processes_answer_every_job_exactly_once(harness: Harness, tmp_path: Path) -> None:
    harness.model.default_reply = Reply(text="An answer.", first_token_delay=0.05)
    env = harness.env(WORKER_CONCURRENCY="2", LOG_FORMAT="json")
    async with harness.running(workers=0):
        workers = [await BotProcess(env, "worker", cwd=tmp_path).start() for _ in range(2)]
        try:
            # Both must be reading before the questions come, or the first one up answers them all.
            await harness.slack.wait_for(
                lambda: all("worker ready" in w.log() for w in workers), 30, "both workers ready"
            )
            threads = [await harness.say(f"question {i}", channel=f"C{i}") for i in range(20)]
            await harness.slack.wait_for(
                lambda: all(finished(harness, f"C{i}", ts) for i, ts in enumerate(threads)), 60, "20 answers"
            )
            await harness.settled()
        finally:
            for worker in workers:
                await worker.stop()
    assert all(finished(harness, f"C{i}", ts) == ["An answer."] for i, ts in enumerate(threads))
    assert len(harness.model.requests) == 20
    done = [[line for line in w.log().splitlines() if '"job done' in line] for w in workers]
    assert len(done[0]) + len(done[1]) == 20 and done[0] and done[1]  # both took part
    assert all(json.loads(line)["thread_key"].startswith(f"{TEAM_ID}:C") for line in done[0] + done[1])
    assert not any("HTTP Request" in w.log() for w in workers)  # the model client's INFO lines stay quiet


async def test_a_follow_up_sent_while_the_first_answer_streams_is_answered_after_it(
    harness: Harness,
) -> None:
    harness.model.script(
        Reply(chunks=[f"w{i} " for i in range(10)], chunk_delay=0.1), Reply(text="About the also.")
    )
    async with harness.running():
        ts = await harness.say("first question")
        await harness.model.wait_for_requests(1)
        await harness.say("also, one more thing", mention=False, thread_ts=ts, user="U2")
        await harness.slack.wait_for(lambda: len(finished(harness, "C1", ts)) == 2, 15, "two answers")
    second = [m["content"] for m in harness.model.requests[1]["messages"][1:]]
    assert second == [
        "alice: first question",
        "".join(f"w{i} " for i in range(10)),
        "bob: also, one more thing",
    ]


async def test_reading_a_thread_back_keeps_only_the_bots_finished_answers(harness: Harness) -> None:
    def bot_message(ts: str, text: str, metadata: dict[str, Any] | None) -> None:
        harness.slack.add_message(
            "C1", ts=ts, user=BOT_USER_ID, text=text, thread_ts=parent, bot_id=BOT_ID, metadata=metadata
        )

    def reply(job: str, part: int, state: str) -> dict[str, Any]:
        return {"event_type": "sgb_reply", "event_payload": {"job": job, "part": part, "state": state}}

    parent = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=parent, user="U1", text="the deploy failed")
    bot_message(harness.slack.next_ts(), "An answer long enough\n\n", reply("1-0", 0, "more"))
    bot_message(harness.slack.next_ts(), "for two messages.", reply("1-0", 1, "done"))
    bot_message(harness.slack.next_ts(), "Half an answ", reply("2-0", 0, "writing"))  # a worker died
    bot_message(harness.slack.next_ts(), "Partial, then :warning: an error", reply("3-0", 0, "failed"))
    bot_message(harness.slack.next_ts(), ":warning: budget used up", reply("4-0", 0, "notice"))
    bot_message(harness.slack.next_ts(), "posted by an older version", None)
    harness.slack.add_message("C1", ts=harness.slack.next_ts(), user="U2", text="any news?", thread_ts=parent)
    async with harness.running():
        await harness.say("summarize", thread_ts=parent)
        await harness.replies_done(1)
    assert [m["content"] for m in harness.model.requests[0]["messages"][1:]] == [
        "alice: the deploy failed",
        "An answer long enough\nfor two messages.",
        "bob: any news?",
        "alice: summarize",
    ]


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "written-but-not-recorded"])
async def test_a_retried_job_rewrites_the_messages_of_the_attempt_before_it(
    harness: Harness, recorded: bool
) -> None:
    """What a worker that died left in the thread (two messages of a long answer, or one it wrote but
    did not live to record) becomes the one complete answer of the job's next attempt."""

    def metadata(part: int) -> dict[str, Any]:
        return {"event_type": "sgb_reply", "event_payload": {"job": "7-0", "part": part, "state": "writing"}}

    question = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=question, user="U1", text=f"<@{BOT_USER_ID}> explain")
    earlier = [harness.slack.next_ts() for _ in range(2 if recorded else 1)]
    for part, ts in enumerate(earlier):
        harness.slack.add_message(
            "C1",
            ts=ts,
            user=BOT_USER_ID,
            bot_id=BOT_ID,
            text=f"half {part}",
            thread_ts=question,
            metadata=metadata(part),
        )
    harness.model.script(Reply(text="The short, complete answer."))
    async with harness.running(workers=0) as services:
        slack = services.require_slack()
        key = ThreadKey(TEAM_ID, "C1", question)
        if recorded:
            for part, ts in enumerate(earlier):
                await services.history.record_part(key, "7-0", part, ts)
        incoming = Incoming(key, question, "U1", f"<@{BOT_USER_ID}> explain", addressed=True, is_dm=False)
        await services.responder(slack.adapter).respond(Job("7-0", incoming, attempt=2))
    messages = harness.slack.bot_messages("C1", question)
    assert [(m["ts"], m["text"], state(m)) for m in messages] == [
        (earlier[0], "The short, complete answer.", "done")
    ]
    assert not harness.slack.calls_to("chat.postMessage") and not harness.slack.calls_to("chat.startStream")


async def test_the_thread_lock_and_the_job_lease_are_renewed_while_a_long_answer_streams(
    harness: Harness,
) -> None:
    words = [f"w{i} " for i in range(40)]
    harness.model.script(Reply(chunks=words, chunk_delay=0.1))  # 4 s: two leases of 2 s
    async with harness.running(job_lease_seconds=2):
        ts = await harness.say("a long one")
        await harness.slack.wait_for(
            lambda: any("w30" in m["text"] for m in harness.slack.bot_messages("C1", ts)), 10, "3 s of it"
        )
        lock_ms = await harness.redis.pttl(f"{harness.prefix}{{{TEAM_ID}:C1:{ts}}}:lock")
        queue = harness.queue().queue_keys[stream_of(ThreadKey(TEAM_ID, "C1", ts))]
        (job,) = [dict(entry) for entry in await harness.redis.xpending_range(queue, "workers", "-", "+", 10)]
        await harness.slack.wait_for(lambda: bool(finished(harness, "C1", ts)), 10, "the whole answer")
    assert 0 < lock_ms <= 2000  # still held, 3 s into a 2 s lease: renewed
    idle, deliveries = int(job["time_since_delivered"]), int(job["times_delivered"])
    assert idle < 2000 and deliveries == 1  # renewed, never reclaimed
    assert finished(harness, "C1", ts) == ["".join(words)]
