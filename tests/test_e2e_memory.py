"""End to end, long threads: the first message kept word for word, the turns a context leaves out folded
into a rolling summary after the reply (incrementally, within budget, in usage), a failing summarizer
that blocks nothing, and ``SUMMARIES=off``. The real bot against the fake Slack and fake model, on Redis.
"""

from __future__ import annotations

import datetime
from typing import Any

import orjson
import pytest

from bot.conversation import SUMMARIZING_NOTE
from bot.domain import Role, ThreadKey, Turn
from bot.history import RedisHistory
from bot.summaries import SUMMARIZER_PROMPT
from bot.tokens import TiktokenCounter
from bot.usage import month_of
from tests.conftest import Harness, next_ts
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID, TEAM_ID

BUDGET = 2000
SUMMARIZER_START = SUMMARIZER_PROMPT[:40]


def is_summarizer(request: dict[str, Any]) -> bool:
    return str(request["messages"][0]["content"]).startswith(SUMMARIZER_START)


async def long_thread(harness: Harness, counter: TiktokenCounter, count: int) -> tuple[ThreadKey, list[Turn]]:
    """A thread of ``count`` stored turns the bot takes part in; its first is the thread's question."""
    key = ThreadKey(TEAM_ID, "C1", next_ts())
    turns = []
    for i in range(count):
        role: Role = "user" if i % 2 == 0 else "assistant"
        text = "the goal: migrate the cache to Redis 7" if i == 0 else f"message number {i} about caching"
        content = f"alice: {text}" if role == "user" else text
        ts = key.thread_ts if i == 0 else ""
        turns.append(Turn(role, text, counter.message_tokens(role, content), "o200k_base", ts, "U1", "alice"))
    await RedisHistory(harness.redis, counter, prefix=harness.prefix).seed(key, turns)
    await harness.queue().join(key)
    harness.slack.add_message("C1", ts=key.thread_ts, user="U1", text=turns[0].text)
    return key, turns


async def ask(harness: Harness, key: ThreadKey, text: str, replies: int) -> None:
    await harness.say(text, thread_ts=key.thread_ts, mention=False)
    await harness.replies_done(replies)
    await harness.settled()


@pytest.mark.cluster
async def test_a_400_turn_thread_keeps_its_first_question_and_a_summary_of_the_middle_within_budget(
    harness: Harness, counter: TiktokenCounter
) -> None:
    key, _ = await long_thread(harness, counter, 400)
    async with harness.running(max_prompt_tokens=BUDGET):
        for n in range(1, 4):
            await ask(harness, key, f"question {n}?", n)
    replies = [r for r in harness.model.requests if not is_summarizer(r)]
    summaries = [r for r in harness.model.requests if is_summarizer(r)]
    assert len(replies) == 3 and summaries
    for request in replies:
        messages = request["messages"]
        assert messages[1]["content"] == "alice: the goal: migrate the cache to Redis 7"  # word for word
        assert sum(counter.message_tokens(m["role"], m["content"]) for m in messages) + 3 <= BUDGET
    # The first reply had no summary yet; the later ones carry the newest summary after the first message.
    assert not any(str(m["content"]).startswith("Earlier in this thread") for m in replies[0]["messages"])
    summary_texts = [f"answer {harness.model.requests.index(r) + 1}" for r in summaries]
    carried = replies[2]["messages"][2]
    assert carried["role"] == "system" and carried["content"].startswith(
        "Earlier in this thread, summarized: "
    )
    assert carried["content"].removeprefix("Earlier in this thread, summarized: ") in summary_texts
    # Incremental: every call gets the summary so far and a part of the thread, never the whole of it.
    for number, request in enumerate(summaries):
        asked = request["messages"][1]["content"]
        previous = "(none yet)" if number == 0 else summary_texts[number - 1]
        assert asked.startswith(f"Summary so far:\n{previous}\n\nNext messages:")
        assert asked.count("message number") < 200
        assert "the goal: migrate" not in asked and "question 3?" not in asked
    memory = await harness.redis.hgetall(
        f"{harness.prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:memory"
    )
    assert memory["summary"] == summary_texts[-1] and int(memory["through"]) > 1
    # The footnote, once: on the first answer that left older messages out.
    answers = [m["text"] for m in harness.slack.thread("C1", key.thread_ts) if m["user"] == BOT_USER_ID]
    assert SUMMARIZING_NOTE in answers[0] and not any(SUMMARIZING_NOTE in a for a in answers[1:])
    # The summarizer's tokens are in usage, counted as summaries.
    usage = await harness.redis.hgetall(
        f"{harness.prefix}{{{TEAM_ID}:usage}}:{month_of(datetime.datetime.now(datetime.UTC))}"
    )
    assert int(usage["all:summaries"]) == len(summaries) and int(usage["all:replies"]) == 3


async def test_a_failing_summarizer_blocks_no_reply_and_is_tried_again_later(
    harness: Harness, counter: TiktokenCounter
) -> None:
    key, _ = await long_thread(harness, counter, 200)
    harness.model.script(
        Reply(text="First answer."),
        Reply(status=400, error_message="summarizer down"),
        Reply(text="Second answer."),
    )
    async with harness.running(max_prompt_tokens=BUDGET):
        await ask(harness, key, "question one?", 1)
        memory_key = f"{harness.prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:memory"
        assert "summary" not in await harness.redis.hgetall(memory_key)
        await ask(harness, key, "question two?", 2)
    answers = [m["text"] for m in harness.slack.thread("C1", key.thread_ts) if m["user"] == BOT_USER_ID]
    assert answers[0].startswith("First answer.") and answers[1].startswith("Second answer.")
    assert not any("summar" in a.lower() and "down" in a for a in answers)  # never shown to anyone
    kept = await harness.redis.hget(memory_key, "summary")
    assert isinstance(kept, str) and kept.startswith("answer ")  # tried again, and kept


async def test_with_summaries_off_nothing_is_summarized_but_the_first_question_stays(
    harness: Harness, counter: TiktokenCounter
) -> None:
    key, _ = await long_thread(harness, counter, 400)
    async with harness.running(max_prompt_tokens=BUDGET, summaries=False):
        await ask(harness, key, "question?", 1)
    (request,) = harness.model.requests
    assert request["messages"][1]["content"] == "alice: the goal: migrate the cache to Redis 7"
    answers = [m["text"] for m in harness.slack.thread("C1", key.thread_ts) if m["user"] == BOT_USER_ID]
    assert answers and not any(SUMMARIZING_NOTE in a for a in answers)


def changed(
    channel: str, ts: str, text: str, previous: str, thread_ts: str, **message: Any
) -> dict[str, Any]:
    """A ``message_changed`` event: the message ``ts`` now says ``text``."""
    return {
        "type": "message",
        "subtype": "message_changed",
        "channel": channel,
        "ts": next_ts(),
        "hidden": True,
        "message": {
            "type": "message",
            "user": "U1",
            "text": text,
            "ts": ts,
            "thread_ts": thread_ts,
            "edited": {"user": "U1", "ts": next_ts()},
            **message,
        },
        "previous_message": {"type": "message", "user": "U1", "text": previous, "ts": ts},
    }


async def test_edits_and_deletions_change_what_the_next_request_holds(
    harness: Harness, counter: TiktokenCounter
) -> None:
    async with harness.running():
        root = await harness.say("what is the plan?")
        await harness.replies_done(1)
        follow = await harness.say("use port 6379", mention=False, thread_ts=root)
        await harness.replies_done(2)
        gone = await harness.say("and a secret aside", mention=False, thread_ts=root)
        await harness.replies_done(3)
        mention = f"<@{BOT_USER_ID}>"
        events = [
            changed("C1", root, f"{mention} what is the goal?", f"{mention} what is the plan?", root),
            changed("C1", follow, "use port 7000, ask <@U2>", "use port 6379", root),
            # Not a person's edit: a bot updating its post, and Slack adding a link preview.
            changed("C1", follow, "a bot's update", "use port 7000, ask <@U2>", root, bot_id="B999"),
            changed("C1", gone, "and a secret aside", "and a secret aside", root),
            {
                "type": "message",
                "subtype": "message_deleted",
                "channel": "C1",
                "ts": next_ts(),
                "deleted_ts": gone,
                "hidden": True,
                "previous_message": {"type": "message", "ts": gone, "thread_ts": root, "user": "U1"},
            },
        ]
        for event in events:
            await harness.slack.send_event(event)
        await harness.settled()
        await harness.say("which port?", mention=False, thread_ts=root)
        await harness.replies_done(4)
    people = [m["content"] for m in harness.model.requests[-1]["messages"] if m["role"] == "user"]
    assert people == ["alice: what is the goal?", "alice: use port 7000, ask @bob", "alice: which port?"]
    key = f"{harness.prefix}{{{TEAM_ID}:C1:{root}}}:turns"
    stored = [orjson.loads(raw) for raw in await harness.redis.lrange(key, 0, -1)]
    [edited] = [t for t in stored if t["ts"] == follow]
    assert edited["tokens"] == counter.message_tokens("user", "alice: use port 7000, ask @bob")
    assert not any("secret aside" in t["text"] or "6379" in t["text"] for t in stored)
