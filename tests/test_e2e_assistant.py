"""End to end, Slack's assistant pane: a new thread greeted with the persona's suggested prompts (or the
settings', or the bot's own), the first question titling the thread, and the status line while the
model works."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

from bot.assistant import DEFAULT_PROMPTS, GREETING
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID, TEAM_ID


async def open_thread(harness: Harness, thread_ts: str, channel: str = "D1") -> None:
    """U1 opens a new thread with the bot in the assistant pane; waits for the suggested prompts."""
    prompts = len(harness.slack.calls_to("assistant.threads.setSuggestedPrompts"))
    context = {"channel_id": "C1", "team_id": "T0001", "enterprise_id": None}
    thread = {"user_id": "U1", "context": context, "channel_id": channel, "thread_ts": thread_ts}
    await harness.slack.send_event({"type": "assistant_thread_started", "assistant_thread": thread})
    await harness.slack.wait_for(
        lambda: len(harness.slack.calls_to("assistant.threads.setSuggestedPrompts")) > prompts,
        what="the suggested prompts",
    )


def suggested(harness: Harness) -> list[str]:
    return [
        p["message"]
        for p in harness.slack.calls_to("assistant.threads.setSuggestedPrompts")[-1].args["prompts"]
    ]


async def test_a_new_thread_is_greeted_with_the_personas_prompts_else_the_settings_else_the_bots(
    harness: Harness, tmp_path: Path
) -> None:
    personas = tmp_path / "personas.yaml"
    personas.write_text(
        "personas:\n  helper:\n    system_prompt: Help.\n    suggested_prompts: [Plan my week, Fix my SQL]\n"
        "channels:\n  D2: helper\n"
    )
    async with harness.running(personas_file=personas):
        root = harness.slack.next_ts()
        await open_thread(harness, root)
        assert suggested(harness) == list(DEFAULT_PROMPTS)
        await open_thread(harness, harness.slack.next_ts(), channel="D2")
        assert suggested(harness) == ["Plan my week", "Fix my SQL"]
    async with harness.running(personas_file=personas, suggested_prompts=["Summarize the news"]):
        await open_thread(harness, harness.slack.next_ts())
        assert suggested(harness) == ["Summarize the news"]
    greeting: dict[str, Any] = harness.slack.calls_to("chat.postMessage")[0].args
    assert (greeting["channel"], greeting["thread_ts"], greeting["text"]) == ("D1", root, GREETING)
    pinned = [k async for k in harness.redis.scan_iter(match=f"{harness.prefix}*:persona")]
    assert pinned == []  # greeting a thread does not pin its persona; the first question does


async def test_the_first_question_titles_the_thread_and_the_status_shows_while_the_model_works(
    harness: Harness,
) -> None:
    harness.model.default_reply = Reply(text="Here you go.")
    question = (
        "How do I rotate the Redis password on the staging cluster without any downtime at all, please?"
    )
    async with harness.running():
        root = harness.slack.next_ts()
        await open_thread(harness, root)
        await harness.say(question, channel="D1", thread_ts=root, mention=False)
        await harness.replies_done(1)
        await harness.say("and on production?", channel="D1", thread_ts=root, mention=False)
        await harness.replies_done(2)
    [title] = harness.slack.calls_to("assistant.threads.setTitle")
    assert title.args["thread_ts"] == root
    assert (
        title.args["title"]
        == "How do I rotate the Redis password on the staging cluster without any downtime…"
    )
    statuses = harness.slack.calls_to("assistant.threads.setStatus")
    assert len(statuses) == 2 and all(s.args["loading_messages"] for s in statuses)
    answers = [m["text"] for m in harness.slack.thread("D1", root) if m.get("user") == BOT_USER_ID]
    assert answers == [GREETING, "Here you go.", "Here you go."]


async def change_view(harness: Harness, thread_ts: str, viewing: str) -> None:
    """U1 switches, beside the pane thread, to channel ``viewing``; waits until the bot knows."""
    context = {"channel_id": viewing, "team_id": TEAM_ID, "enterprise_id": None}
    thread = {"user_id": "U1", "context": context, "channel_id": "D1", "thread_ts": thread_ts}
    await harness.slack.send_event({"type": "assistant_thread_context_changed", "assistant_thread": thread})
    key = f"{harness.prefix}{{{TEAM_ID}:D1:{thread_ts}}}:viewing"

    async def known() -> bool:
        return await harness.redis.get(key) == viewing

    for _ in range(500):
        if await known():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the bot never learnt that {viewing} is viewed")


async def test_a_question_about_this_channel_reads_the_channel_viewed_and_says_what_span(
    harness: Harness,
) -> None:
    harness.slack.bot_channels = [{"id": "C2", "name": "ops"}]
    said = []
    for user, text in [("U2", "the deploy failed at 09:00"), ("U1", "rolled back"), ("U2", "fixed now")]:
        ts = harness.slack.next_ts()
        harness.slack.add_message("C2", ts=ts, user=user, text=text)
        said.append(ts)
    harness.slack.add_message("C2", ts=harness.slack.next_ts(), user="U2", text="a reply", thread_ts=said[0])
    harness.model.default_reply = Reply(text="A deploy failed and was fixed.")
    first, last = (
        datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M")
        for ts in (said[0], said[-1])
    )
    async with harness.running():
        root = harness.slack.next_ts()
        await open_thread(harness, root)
        await change_view(harness, root, "C2")
        await harness.say("summarize this channel", channel="D1", thread_ts=root, mention=False)
        await harness.replies_done(1)
        await harness.say("who fixed it?", channel="D1", thread_ts=root, mention=False)
        await harness.replies_done(2)
        await change_view(harness, root, "C3")  # a channel the bot is not in
        await harness.say("and the current channel?", channel="D1", thread_ts=root, mention=False)
        await harness.replies_done(3)
    names = {u: harness.slack.users[u]["profile"]["display_name"] for u in ("U1", "U2")}
    excerpt = (
        f"summarize this channel\n\n[channel <#C2>: its last 3 messages, {first} to {last} UTC]\n"
        f"{names['U2']}: the deploy failed at 09:00\n{names['U1']}: rolled back\n{names['U2']}: fixed now"
    )
    summary, follow_up, elsewhere = harness.model.requests
    assert summary["messages"][-1]["content"].endswith(excerpt)
    assert any(m["content"].endswith(excerpt) for m in follow_up["messages"][:-1])  # kept with the turn
    assert len(harness.slack.calls_to("conversations.history")) == 2  # not for the follow-up
    answers = [m["text"] for m in harness.slack.thread("D1", root) if m.get("user") == BOT_USER_ID]
    span = f"_(I read the last 3 messages of <#C2>, from {first} to {last} UTC.)_"
    assert answers[1] == f"{span}\n\nA deploy failed and was fixed."
    assert answers[2] == "A deploy failed and was fixed."
    assert answers[3].startswith("_(I'm not in <#C3>, so I can't read it: add me to it first)_\n\n")
    assert "[channel" not in elsewhere["messages"][-1]["content"]
