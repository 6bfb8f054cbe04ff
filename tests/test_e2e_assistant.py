"""End to end, Slack's assistant pane: a new thread greeted with the persona's suggested prompts (or the
settings', or the bot's own), the first question titling the thread, and the status line while the
model works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.assistant import DEFAULT_PROMPTS, GREETING
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID


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
