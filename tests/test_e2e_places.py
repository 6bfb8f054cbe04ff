"""End to end, where the bot answers: ALLOWED_CHANNELS, DENIED_CHANNELS and ALLOW_DMS.

The real bot against the fake Slack and fake model, on a real Redis.
"""

from __future__ import annotations

from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID


def bot_texts(harness: Harness, channel: str, ts: str) -> list[str]:
    return [m["text"] for m in harness.slack.thread(channel, ts) if m.get("user") == BOT_USER_ID]


async def thread_keys(harness: Harness, channel: str) -> list[str]:
    """Every key the bot holds about threads of ``channel`` (their memory, lock, job progress, joined),
    but the hour's dedup markers of its messages (ids only)."""
    keys = [k async for k in harness.redis.scan_iter(f"{harness.prefix}*:{channel}:*")]
    return [
        k for k in map(str, (k.decode() if isinstance(k, bytes) else k for k in keys)) if ":seen:" not in k
    ]


async def test_outside_the_allowed_channels_it_says_once_where_to_ask_and_keeps_nothing(
    harness: Harness,
) -> None:
    harness.slack.channel_names = {"C1": "general", "C2": "random"}
    harness.model.script(Reply(text="Answered in general."))
    async with harness.running(allowed_channels="#General, C9HELP"):
        refused = await harness.say("hello from random", channel="C2")
        await harness.settled()
        again = await harness.say("anyone?", channel="C2", user="U2")
        follow_up = await harness.say("still there?", channel="C2", thread_ts=refused, mention=False)
        await harness.settled()
        answered = await harness.say("hello from general", channel="C1")
        await harness.replies_done(1)
        await harness.settled()
    assert bot_texts(harness, "C2", refused) == [
        ":warning: I'm not used in this channel. Ask me in <#C9HELP>, #general or a direct message with me."
    ]
    assert bot_texts(harness, "C2", again) == []  # told once, not to every mention
    assert bot_texts(harness, "C2", follow_up) == []
    assert bot_texts(harness, "C1", answered) == ["Answered in general."]
    assert len(harness.model.requests) == 1
    assert await thread_keys(harness, "C2") == []  # no turns, no persona pin, not joined
    assert len(harness.slack.calls_to("conversations.info")) == 2  # a name is looked up once


async def test_a_denied_channel_and_direct_messages_are_refused_elsewhere_it_answers(
    harness: Harness,
) -> None:
    harness.model.script(Reply(text="Answered in C1."))
    async with harness.running(denied_channels="C2", allow_dms=False):
        in_dm = await harness.say("a private question", channel="D1")
        denied = await harness.say("a question in C2", channel="C2")
        await harness.settled()
        allowed = await harness.say("a question in C1", channel="C1")
        await harness.replies_done(1)
        await harness.settled()
    assert bot_texts(harness, "D1", in_dm) == [
        ":warning: I don't answer direct messages here. Ask me in a channel."
    ]
    assert bot_texts(harness, "C2", denied) == [
        ":warning: I'm not used in this channel. Ask me in another channel."
    ]
    assert bot_texts(harness, "C1", allowed) == ["Answered in C1."]
    assert len(harness.model.requests) == 1
    assert await thread_keys(harness, "D1") == [] and await thread_keys(harness, "C2") == []
    assert harness.slack.calls_to("conversations.info") == []  # ids need no lookup


async def test_a_channel_whose_name_cannot_be_looked_up_is_tried_again_not_answered_blindly(
    harness: Harness,
) -> None:
    harness.slack.channel_names = {"C1": "general"}
    harness.model.script(Reply(text="Answered."))
    harness.slack.fail_http("conversations.info", 500, times=1)
    async with harness.running(denied_channels="random", job_lease_seconds=2):
        ts = await harness.say("hello", channel="C1")
        await harness.replies_done(1, timeout=20)
        await harness.settled()
    assert bot_texts(harness, "C1", ts) == ["Answered."]
    assert len(harness.model.requests) == 1


async def test_a_shortcut_where_the_bot_does_not_answer_is_refused_to_its_user_each_time(
    harness: Harness,
) -> None:
    ts = harness.slack.next_ts()
    harness.slack.add_message("C2", ts=ts, user="U2", text="Bonjour tout le monde")
    async with harness.running(denied_channels="C2"):
        for _ in range(2):
            await harness.slack.use_shortcut("translate_message", "C2", ts, "U1")
        await harness.slack.wait_for(lambda: len(harness.slack.responses()) == 2, what="two refusals")
        await harness.settled()
    refusal = ":warning: I'm not used in this channel. Ask me in another channel or a direct message with me."
    assert harness.slack.responses() == [refusal, refusal]
    assert harness.model.requests == []
    assert [m["ts"] for m in harness.slack.thread("C2", ts)] == [ts]  # nothing posted there
