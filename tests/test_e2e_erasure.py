"""End to end, erasure: ``/forget me``, ``/forget channel``, and the app's uninstallation.

The real bot against the fake Slack and fake model, on a real Redis; what is left is read back from
Redis itself, every key under the test's prefix.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID, TEAM_ID


async def everything(harness: Harness) -> dict[str, str]:
    """Every key under the test's prefix, with its whole value as text."""
    dump: dict[str, str] = {}
    async for key in harness.redis.scan_iter(f"{harness.prefix}*"):
        name = key.decode() if isinstance(key, bytes) else str(key)
        kind = await harness.redis.type(name)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value: Any
        if kind == "string":
            value = await harness.redis.get(name)
        elif kind == "list":
            value = await harness.redis.lrange(name, 0, -1)
        elif kind == "hash":
            value = await harness.redis.hgetall(name)
        elif kind == "set":
            value = await harness.redis.smembers(name)
        elif kind == "stream":
            value = await harness.redis.xrange(name)
        else:
            value = kind
        dump[name] = repr(value)
    return dump


def holding(dump: dict[str, str], needle: str) -> list[str]:
    return [key for key, value in dump.items() if needle in key or needle in value]


async def forget(harness: Harness, what: str, *, user: str, channel: str = "C1") -> str:
    before = len(harness.slack.responses())
    await harness.slack.send_command(what, command="/forget", user=user, channel=channel)
    await harness.slack.wait_for(lambda: len(harness.slack.responses()) > before, what="/forget's answer")
    return harness.slack.responses()[-1]


async def set_persona(harness: Harness, prompt: str, *, channel: str, user: str) -> None:
    """``/persona set`` by ``user``, waited for until Redis holds it."""
    await harness.slack.send_command(f"set {prompt}", channel=channel, user=user)
    key = f"{harness.prefix}{{{TEAM_ID}:persona:{channel}}}:channel"
    for _ in range(500):
        if await harness.redis.exists(key):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"/persona set in {channel} was not kept")


async def finished_answers(harness: Harness, n: int) -> None:
    await harness.replies_done(n)
    await harness.settled()


async def comment_on(harness: Harness, answer_ts: str, user: str, text: str) -> None:
    """A thumbs-down on an answer, then a comment in the modal it opens."""
    opened = len(harness.slack.calls_to("views.open"))
    await harness.slack.click_feedback("C1", answer_ts, user, positive=False)
    await harness.slack.wait_for(lambda: len(harness.slack.calls_to("views.open")) > opened, what="modal")
    view = harness.slack.calls_to("views.open")[-1].args["view"]
    await harness.slack.send_interaction(
        {
            "type": "view_submission",
            "user": {"id": user},
            "view": {
                "type": "modal",
                "id": "V1",
                "callback_id": "feedback_comment",
                "private_metadata": view["private_metadata"],
                "state": {"values": {"comment": {"text": {"type": "plain_text_input", "value": text}}}},
            },
        }
    )


def bot_ts(harness: Harness, channel: str, thread_ts: str) -> str:
    mine = [m for m in harness.slack.thread(channel, thread_ts) if m.get("user") == BOT_USER_ID]
    return str(mine[-1]["ts"])


@pytest.mark.cluster
async def test_forget_me_leaves_no_key_holding_the_persons_id_or_words(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="An answer.")
    harness.slack.members = {"C1": ["U1", "U2"]}
    async with harness.running():
        shared = await harness.say("alpha-secret question from alice", user="U1")
        await finished_answers(harness, 1)
        await harness.say("bob follows up", user="U2", thread_ts=shared, mention=False)
        await finished_answers(harness, 2)
        await harness.say("delta-private question in our DM", channel="D1", user="U1")
        await finished_answers(harness, 3)
        await set_persona(harness, "You are alice's omega-coach.", channel="D1", user="U1")
        await set_persona(harness, "You are a kappa-tester.", channel="C1", user="U1")
        await harness.say("bob-own thread", user="U2")
        await finished_answers(harness, 4)
        await comment_on(harness, bot_ts(harness, "C1", shared), "U1", "sigma-complaint")
        await asyncio.sleep(0.2)  # the comment is kept before its ack; the vote too
        before = await everything(harness)
        answer = await forget(harness, "me", user="U1")
        after = await everything(harness)
        # The thread alice shared goes on without her question.
        await harness.say("bob again", user="U2", thread_ts=shared, mention=False)
        await finished_answers(harness, 5)

    for needle in ("U1", "alpha-secret", "delta-private", "omega-coach", "sigma-complaint"):
        assert holding(before, needle), needle  # it was there...
        assert holding(after, needle) == [], needle  # ...and nothing holds it now
    assert answer.startswith("Deleted what I kept about you: 1 message of yours in 1 thread;")
    for part in (
        "1 thread of our direct messages",
        "your persona for our direct messages",
        "your name on 1 persona change",
        "1 feedback vote and 1 comment",
        "your usage figures",
    ):
        assert part in answer, part
    # Bob's words, the workspace's totals and alice's channel persona (now nobody's) stay.
    assert holding(after, "bob follows up") and holding(after, "bob-own thread")
    assert holding(after, "kappa-tester")
    month = [k for k in after if k.startswith(f"{harness.prefix}{{{TEAM_ID}:usage}}:") and k.count(":") == 3]
    assert month and all("'all:prompt'" in after[k] for k in month)
    last_request = [m["content"] for m in harness.model.requests[-1]["messages"]]
    assert not any("alpha-secret" in c for c in last_request)
    assert any("bob follows up" in c for c in last_request)


@pytest.mark.cluster
async def test_forget_channel_is_for_admins_and_takes_the_channels_threads_and_persona(
    harness: Harness,
) -> None:
    harness.model.default_reply = Reply(text="An answer.")
    async with harness.running(persona_admins="U9"):
        await harness.say("a question in C1", user="U1")
        await harness.say("a question in C2", user="U1", channel="C2")
        await finished_answers(harness, 2)
        await set_persona(harness, "You are a C1 bot.", channel="C1", user="U9")
        refused = await forget(harness, "channel", user="U1")
        kept = await everything(harness)
        done = await forget(harness, "channel", user="U9")
        after = await everything(harness)
        unknown = await forget(harness, "everything", user="U1")
    assert refused == "Sorry, only PERSONA_ADMINS may use `/forget channel`."
    assert holding(kept, "a question in C1")
    assert done.startswith("Deleted what I kept of this channel: 1 thread,")
    assert holding(after, "a question in C1") == [] and holding(after, "C1 bot") == []
    assert [k for k in after if f"{{{TEAM_ID}:C1:" in k] == []
    assert holding(after, "a question in C2")  # another channel is untouched
    assert unknown.startswith("I don't know `/forget everything`.") and "*/forget me*" in unknown


@pytest.mark.cluster
async def test_uninstalling_deletes_the_workspace_and_nothing_else(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="An answer.")
    harness.slack.members = {"C1": ["U1"]}
    other = f"{harness.prefix}{{T0OTHER:C1:1.0}}:turns"
    await harness.redis.rpush(other, "another workspace's turn")
    async with harness.running():
        await harness.say("a question", user="U1")
        await harness.say("a DM question", user="U1", channel="D1")
        await finished_answers(harness, 2)
        await set_persona(harness, "You are a C1 bot.", channel="C1", user="U1")
        # Revoking only people's tokens leaves the bot working: nothing is deleted.
        await harness.slack.send_event({"type": "tokens_revoked", "tokens": {"oauth": ["U1"]}})
        await harness.settled()
        kept = await everything(harness)
        await harness.slack.send_event({"type": "app_uninstalled"})
        await harness.settled()
        after = await everything(harness)
    assert holding(kept, "a question") and holding(kept, "C1 bot")
    # The streams a worker created stay, empty, for the workers.
    assert {k for k in after if TEAM_ID in k} == set(harness.queue().queue_keys)
    assert await harness.queued() == 0
    assert other in after


async def test_start_over_forgets_the_threads_earlier_messages_without_reading_them_again(
    harness: Harness,
) -> None:
    harness.model.default_reply = Reply(text="An answer.")
    async with harness.running():
        root = await harness.say("the old topic", user="U1")
        await finished_answers(harness, 1)
        follow_up = await harness.say("more on the old topic", user="U2", thread_ts=root, mention=False)
        await finished_answers(harness, 2)
        before = len(harness.slack.responses())
        await harness.slack.use_shortcut("start_thread_over", "C1", follow_up, "U2")
        await harness.slack.wait_for(lambda: len(harness.slack.responses()) > before, what="the answer")
        answer = harness.slack.responses()[-1]
        reads = len(harness.slack.calls_to("conversations.replies"))
        await harness.say("a new topic", user="U2", thread_ts=root, mention=False)
        await finished_answers(harness, 3)
        again = await harness.say("and on", user="U1", thread_ts=root, mention=False)
        await finished_answers(harness, 4)
        await harness.slack.use_shortcut("start_thread_over", "C1", again, "U1")
        await harness.slack.wait_for(lambda: len(harness.slack.responses()) > before + 1, what="again")
    assert answer == (
        "I forgot the 4 earlier messages of this thread I kept: I'll answer what comes next afresh. "
        "Nothing in Slack was deleted."
    )
    assert [m["content"] for m in harness.model.requests[2]["messages"]] == [
        "You are a test bot.",
        "bob: a new topic",
    ]
    assert len(harness.slack.calls_to("conversations.replies")) == reads  # not read from Slack again
    assert [m["content"] for m in harness.model.requests[3]["messages"]][1:] == [
        "bob: a new topic",
        "An answer.",
        "alice: and on",
    ]
    assert harness.slack.responses()[-1].startswith("I forgot the 4 earlier messages")
    assert harness.slack.thread("C1", root)[0]["text"].endswith("the old topic")  # Slack keeps it all
