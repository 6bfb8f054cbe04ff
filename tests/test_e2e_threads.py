"""End to end, conversations: threads, follow-ups, DMs, reading unseen threads, dedup, concurrency, trimming.

The real bot (Bolt in Socket Mode, slack_sdk, openai, Redis) against the fake Slack and fake model.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bot.domain import Role, ThreadKey, Turn
from bot.history import RedisHistory
from bot.tokens import TiktokenCounter
from tests.conftest import Harness, next_ts
from tests.fake_model import Reply
from tests.fake_slack import BOT_ID, BOT_USER_ID, TEAM_ID


def contents(request: dict[str, object]) -> list[str]:
    return [m["content"] for m in request["messages"]]  # type: ignore[attr-defined]


@pytest.mark.cluster
async def test_mention_gets_a_threaded_streamed_answer_after_the_ack(harness: Harness) -> None:
    harness.model.script(Reply(text="Use CONFIG SET requirepass.", first_token_delay=0.3))
    async with harness.running():
        ts = await harness.say("how do I rotate a Redis password?")
        acked_at = max(harness.slack.acks.values())
        await harness.replies_done(1)
    thread = harness.slack.thread("C1", ts)
    assert [m["user"] for m in thread] == ["U1", BOT_USER_ID]
    assert thread[1]["text"] == "Use CONFIG SET requirepass."
    start = harness.slack.calls_to("chat.startStream")[0]
    assert start.args["thread_ts"] == ts and start.args["recipient_user_id"] == "U1"
    # Nothing slow before the ack: the event is acked before the bot writes anything to Slack.
    assert acked_at < start.at
    assert harness.slack.calls_to("assistant.threads.setStatus")[0].args["thread_ts"] == ts
    request = harness.model.requests[0]
    assert request["messages"][0] == {"role": "system", "content": "You are a test bot."}
    assert request["messages"][-1] == {"role": "user", "content": "alice: how do I rotate a Redis password?"}


@pytest.mark.cluster
async def test_follow_up_without_mention_is_answered_with_the_thread_history(harness: Harness) -> None:
    harness.model.script(Reply(text="First answer."), Reply(text="Second answer."))
    async with harness.running():
        ts = await harness.say("first question")
        await harness.replies_done(1)
        await harness.say("and a follow-up", mention=False, thread_ts=ts, user="U2")
        await harness.replies_done(2)
    assert contents(harness.model.requests[1])[1:] == [
        "alice: first question",
        "First answer.",
        "bob: and a follow-up",
    ]
    assert harness.slack.thread("C1", ts)[-1]["text"] == "Second answer."


async def test_thread_reply_where_the_bot_never_spoke_is_ignored(harness: Harness) -> None:
    async with harness.running():
        parent = await harness.say("a human conversation", mention=False, event_type="message")
        await harness.say("a reply among humans", mention=False, thread_ts=parent)
        ts = await harness.say("now a real question")
        await harness.replies_done(1)
    assert len(harness.model.requests) == 1
    assert contents(harness.model.requests[0])[-1] == "alice: now a real question"
    assert all(
        c.args.get("thread_ts") in (None, ts) for c in harness.slack.calls if c.method.startswith("chat.")
    )


@pytest.mark.cluster
async def test_mention_mid_thread_reads_the_thread_first(harness: Harness) -> None:
    parent = next_ts()
    harness.slack.add_message(
        "C1", ts=parent, user="U1", text="Our deploy failed with <https://ci.example/1|build 1>"
    )
    harness.slack.add_message(
        "C1", ts=next_ts(), user="U2", text="I think it is the &lt;cache&gt;", thread_ts=parent
    )
    harness.slack.add_message(
        "C1", ts=next_ts(), user=None, text="CI bot says: red", thread_ts=parent, bot_id="BOTHER"
    )
    async with harness.running():
        await harness.say("summarize this thread", thread_ts=parent, user="U2")
        await harness.replies_done(1)
    assert harness.slack.calls_to("conversations.replies")[0].args["ts"] == parent
    assert contents(harness.model.requests[0])[1:] == [
        "alice: Our deploy failed with build 1 (https://ci.example/1)",
        "bob: I think it is the <cache>",
        "a bot: CI bot says: red",
        "bob: summarize this thread",
    ]


async def ask_in_a_long_thread(
    harness: Harness, replies: int, question: str, *, even_pace: bool = True
) -> list[str]:
    """A thread of ``replies`` replies ("reply 1", ...) under "reply 0", the bot asked in it; the texts
    of the turns it stored. At an even pace the messages take the fake Slack's clock,
    as the question does; otherwise they all came long before it."""
    clock = harness.slack.next_ts if even_pace else next_ts
    channel, parent = "C1", clock()
    harness.slack.add_message(channel, ts=parent, user="U1", text="reply 0")
    for number in range(1, replies + 1):
        harness.slack.add_message(channel, ts=clock(), user="U2", text=f"reply {number}", thread_ts=parent)
    async with harness.running():
        await harness.say(question, thread_ts=parent, user="U1")
        await harness.replies_done(1)
    raw_turns = await harness.redis.lrange(f"{harness.prefix}{{{TEAM_ID}:{channel}:{parent}}}:turns", 0, -1)
    return [json.loads(raw)["text"] for raw in raw_turns]


async def test_a_long_unseen_thread_is_read_from_its_first_page_and_its_newest_replies(
    harness: Harness,
) -> None:
    stored = await ask_in_a_long_thread(harness, 3000, "what was said last?")
    numbers = [int(text.split()[1]) for text in stored if text.startswith("reply ")]
    # The first page (the parent and 199 replies), then at least the newest 1,000, in order; the middle
    # is left unread, and so are the pages it would have taken.
    assert numbers[:200] == list(range(200))
    newest = numbers[200:]
    assert newest == list(range(newest[0], 3001)) and len(newest) >= 1000 and newest[0] > 200
    assert stored[-2:] == ["what was said last?", "answer 1"]
    assert len(harness.slack.calls_to("conversations.replies")) < 3001 // 200
    assert contents(harness.model.requests[0])[-2:] == ["bob: reply 3000", "alice: what was said last?"]
    assert contents(harness.model.requests[0])[1] == "alice: reply 0"


async def test_a_long_thread_at_an_uneven_pace_still_gets_its_newest_replies_read(harness: Harness) -> None:
    stored = await ask_in_a_long_thread(harness, 1499, "and now?", even_pace=False)
    # The guessed window held only the question: widened, it reads the rest, never fewer than 1,000.
    assert stored[-1002:] == [*(f"reply {n}" for n in range(500, 1500)), "and now?", "answer 1"]
    assert stored[:200] == [f"reply {n}" for n in range(200)]


async def test_an_unseen_thread_within_the_limit_is_read_whole(harness: Harness) -> None:
    stored = await ask_in_a_long_thread(harness, 1099, "and now?")
    assert stored == [*(f"reply {n}" for n in range(1100)), "and now?", "answer 1"]


@pytest.mark.cluster
async def test_direct_messages_are_answered_without_mention_in_a_thread(harness: Harness) -> None:
    harness.model.script(Reply(text="DM answer 1"), Reply(text="DM answer 2"))
    async with harness.running():
        ts = await harness.say("hello in private", channel="D1", mention=False)
        await harness.replies_done(1)
        await harness.say("and more", channel="D1", mention=False, thread_ts=ts)
        await harness.replies_done(2)
    thread = harness.slack.thread("D1", ts)
    assert [m["text"] for m in thread] == ["hello in private", "DM answer 1", "and more", "DM answer 2"]
    assert contents(harness.model.requests[1])[1:] == [
        "alice: hello in private",
        "DM answer 1",
        "alice: and more",
    ]


@pytest.mark.cluster
async def test_the_same_message_delivered_twice_is_answered_once(harness: Harness) -> None:
    async with harness.running():
        ts = await harness.say("once please", event_id="Ev1")
        # Slack's retry of the same event, and the message.channels twin of the app_mention.
        await harness.say("once please", ts=ts, mention=False, event_id="Ev1", event_type="app_mention")
        await harness.say(f"<@{BOT_USER_ID}> once please", ts=ts, mention=False, event_type="message")
        other = await harness.say("a different question")
        await harness.replies_done(2)
        await harness.settled()
    assert len(harness.model.requests) == 2
    assert {c.args["thread_ts"] for c in harness.slack.calls_to("chat.startStream")} == {ts, other}


@pytest.mark.cluster
async def test_two_messages_at_once_in_a_thread_are_answered_in_turn(harness: Harness) -> None:
    harness.model.script(
        Reply(text="first", first_token_delay=0.1), Reply(text="opening"), Reply(text="second")
    )
    async with harness.running():
        ts = await harness.say("start")
        await harness.replies_done(1)
        await asyncio.gather(
            harness.say("question A", mention=False, thread_ts=ts),
            harness.say("question B", mention=False, thread_ts=ts, user="U2"),
        )
        await harness.replies_done(3)
    second, third = contents(harness.model.requests[1]), contents(harness.model.requests[2])
    # Whichever came second saw the first one's question and answer.
    assert third[-3:-1] == [second[-1], "opening"]
    stops = harness.slack.calls_to("chat.stopStream")
    assert harness.slack.calls_to("chat.startStream")[2].at > stops[1].at


@pytest.mark.cluster
async def test_a_long_thread_is_trimmed_to_the_budget_keeping_prompt_and_question(
    harness: Harness, counter: TiktokenCounter
) -> None:
    budget = 2000
    key = ThreadKey(TEAM_ID, "C1", next_ts())
    history = RedisHistory(harness.redis, counter, prefix=harness.prefix)
    turns = []
    for i in range(2000):
        role: Role = "user" if i % 2 == 0 else "assistant"
        text = f"message number {i} about caching, 日本語のテキスト {i}"
        content = f"alice: {text}" if role == "user" else text
        turns.append(
            Turn(role, text, counter.message_tokens(role, content), "o200k_base", speaker_name="alice")
        )
    await history.seed(key, turns)
    await harness.queue().join(key)  # a thread the bot takes part in
    harness.slack.add_message("C1", ts=key.thread_ts, user="U1", text="parent")
    async with harness.running(max_prompt_tokens=budget):
        await harness.say("what was the last number?", thread_ts=key.thread_ts, mention=False)
        await harness.replies_done(1)
    messages = harness.model.requests[0]["messages"]
    assert messages[0]["content"] == "You are a test bot."
    assert messages[-1]["content"] == "alice: what was the last number?"
    total = sum(counter.message_tokens(m["role"], m["content"]) for m in messages) + 3
    assert total <= budget
    assert messages[1]["content"] == turns[0].content  # the thread's first message, word for word
    kept = [m["content"] for m in messages[2:-1]]
    assert 20 < len(kept) < 2000
    assert kept == [t.content for t in turns[-len(kept) :]]  # then the newest turns, in order


async def test_bot_ignores_itself_other_bots_and_edits(harness: Harness) -> None:
    async with harness.running():
        ts = await harness.say("question")
        await harness.replies_done(1)
        await harness.say("my own echo", thread_ts=ts, mention=False, user=BOT_USER_ID, bot_id=BOT_ID)
        await harness.say(f"<@{BOT_USER_ID}> from another bot", thread_ts=ts, mention=False, bot_id="B999")
        await harness.say(
            "edited", thread_ts=ts, mention=False, event_type="message", subtype="message_changed"
        )
        await harness.say(
            "deleted", thread_ts=ts, mention=False, event_type="message", subtype="message_deleted"
        )
        await harness.say("a real follow-up", thread_ts=ts, mention=False)
        await harness.replies_done(2)
        await harness.settled()
    assert len(harness.model.requests) == 2
    assert contents(harness.model.requests[1])[-1] == "alice: a real follow-up"


async def test_empty_mention_gets_a_hint_and_no_model_call(harness: Harness) -> None:
    async with harness.running():
        ts = await harness.say("")
        await harness.slack.wait_for(lambda: bool(harness.slack.calls_to("chat.postMessage")), what="hint")
    assert harness.model.requests == []
    hint = harness.slack.calls_to("chat.postMessage")[0].args
    assert hint["thread_ts"] == ts and "Ask me something" in hint["markdown_text"]


async def test_markup_reaches_the_model_as_readable_text(harness: Harness) -> None:
    async with harness.running():
        await harness.say(
            "ask <@U2> about <#C9|general> and <https://x.io/a?b=1&amp;c=2|the docs> &amp; <!here>"
        )
        await harness.replies_done(1)
    assert contents(harness.model.requests[0])[-1] == (
        "alice: ask @bob about #general and the docs (https://x.io/a?b=1&c=2) & @here"
    )
    # Names are looked up once and cached in Redis, per workspace.
    assert await harness.redis.hget(f"{harness.prefix}user:{TEAM_ID}:U2", "name") == "bob"
