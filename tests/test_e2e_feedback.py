"""End to end, feedback: thumbs-up/down buttons under every finished answer (in each way of writing a
reply), clicks counted once per person and answer (changing one's mind moves the vote), the comment
after a thumbs-down, and the helpfulness rate and comments in /usage."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID, TEAM_ID


def feedback_buttons(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        element
        for block in message.get("blocks") or []
        if block["type"] == "context_actions"
        for element in block["elements"]
        if element["type"] == "feedback_buttons"
    ]


def bot_messages(harness: Harness, thread_ts: str, channel: str = "C1") -> list[dict[str, Any]]:
    return [m for m in harness.slack.thread(channel, thread_ts) if m.get("user") == BOT_USER_ID]


async def answered(harness: Harness, text: str, *, thread_ts: str | None = None) -> tuple[str, str]:
    """Ask, wait until the answer is finished (its metadata says done); (question ts, answer ts)."""
    asked = await harness.say(text, thread_ts=thread_ts)
    thread = thread_ts or asked

    def done() -> bool:
        last = bot_messages(harness, thread)[-1:] or [{}]
        return ((last[0].get("metadata") or {}).get("event_payload") or {}).get("state") == "done"

    await harness.slack.wait_for(done, what="a finished answer")
    return asked, bot_messages(harness, thread)[-1]["ts"]


def month_key(harness: Harness) -> str:
    return f"{harness.prefix}{{{TEAM_ID}:feedback}}:month:{datetime.datetime.now(datetime.UTC):%Y-%m}"


@pytest.mark.parametrize("stream_mode", ["native", "update", "off"])
async def test_a_finished_answer_carries_feedback_buttons_in_every_way_of_writing(
    harness: Harness, stream_mode: str
) -> None:
    harness.model.script(Reply(text="Rotate it with CONFIG SET.", chunk_size=5))
    async with harness.running(stream_mode=stream_mode):
        asked, _ = await answered(harness, "how do I rotate a password?")
    [answer] = bot_messages(harness, asked)
    assert answer["text"] == "Rotate it with CONFIG SET."
    [buttons] = feedback_buttons(answer)
    values = [json.loads(buttons[side]["value"]) for side in ("positive_button", "negative_button")]
    today = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
    assert values == [{"v": vote, "p": "default", "m": "gpt-4o-mini", "d": today} for vote in ("up", "down")]


async def test_notices_and_answers_with_feedback_off_carry_no_buttons(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="fine")
    async with harness.running(feedback=False):
        asked, _ = await answered(harness, "hello")
    async with harness.running():
        hint = await harness.say("")  # a mention without a question gets a hint
        await harness.slack.wait_for(lambda: bool(bot_messages(harness, hint)), what="the hint")
    assert feedback_buttons(bot_messages(harness, asked)[0]) == []
    [notice] = bot_messages(harness, hint)
    assert feedback_buttons(notice) == []


@pytest.mark.cluster
async def test_each_persons_last_click_counts_once_and_usage_shows_the_rate(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="an answer")
    async with harness.running(persona_admins="U9"):
        _, first = await answered(harness, "one")
        _, second = await answered(harness, "two")
        for channel, ts, user, positive in [
            ("C1", first, "U1", True),
            ("C1", first, "U1", True),  # the same click again: nothing changes
            ("C1", first, "U1", False),  # a change of mind: the vote moves
            ("C1", first, "U2", True),
            ("C1", second, "U2", True),
        ]:
            await harness.slack.click_feedback(channel, ts, user, positive=positive)
        # Each click is counted before Slack hears back; only the first thumbs-down asks for a comment.
        counts = await harness.redis.hgetall(month_key(harness))
        assert (counts["C1|default|gpt-4o-mini|up"], counts["C1|default|gpt-4o-mini|down"]) == ("2", "1")
        await harness.slack.wait_for(lambda: bool(harness.slack.calls_to("views.open")), what="the modal")
        await harness.slack.send_command("", command="/usage", user="U1")
        await harness.slack.wait_for(lambda: len(harness.slack.responses()) == 1, what="the report")
    report = harness.slack.responses("U1")[0]
    assert (
        "*Helpful answers this month* (this channel)\n• default on gpt-4o-mini: 67% helpful (2 of 3)"
        in report
    )
    votes = f"{harness.prefix}{{{TEAM_ID}:feedback}}:votes:C1:{first}"
    assert await harness.redis.hgetall(votes) == {"U1": "down", "U2": "up"}


async def test_a_thumbs_down_may_leave_a_comment_that_admins_see(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="a wrong answer")
    async with harness.running(persona_admins="U9"):
        asked, answer = await answered(harness, "what is 2 + 2?")
        await harness.slack.click_feedback("C1", answer, "U1", positive=False)
        await harness.slack.wait_for(lambda: bool(harness.slack.calls_to("views.open")), what="the modal")
        view = harness.slack.calls_to("views.open")[-1].args["view"]
        assert view["callback_id"] == "feedback_comment" and view["blocks"][0]["optional"] is True
        submission = {
            "type": "view_submission",
            "user": {"id": "U1"},
            "view": {
                "type": "modal",
                "id": "V1",
                "callback_id": "feedback_comment",
                "private_metadata": view["private_metadata"],
                "state": {
                    "values": {"comment": {"text": {"type": "plain_text_input", "value": "It said 5"}}}
                },
            },
        }
        assert await harness.slack.send_interaction(submission) == {}  # kept before the modal closes
        for user in ("U1", "U9"):
            await harness.slack.send_command("", command="/usage", user=user)
        await harness.slack.wait_for(lambda: len(harness.slack.responses()) == 2, what="two reports")
    comments_key = f"{harness.prefix}{{{TEAM_ID}:feedback}}:comments"
    [raw] = await harness.redis.lrange(comments_key, 0, -1)
    comment = json.loads(raw)
    assert {
        k: comment[k] for k in ("user", "channel", "thread_ts", "message_ts", "persona", "model", "text")
    } == {
        "user": "U1",
        "channel": "C1",
        "thread_ts": asked,
        "message_ts": answer,
        "persona": "default",
        "model": "gpt-4o-mini",
        "text": "It said 5",
    }
    mine, admin = harness.slack.responses("U1")[0], harness.slack.responses("U9")[0]
    assert "It said 5" not in mine
    assert "*Recent comments on unhelpful answers*\n• <#C1>, default on gpt-4o-mini: “It said 5”" in admin
    assert "• default on gpt-4o-mini: 0% helpful (0 of 1)" in admin


async def test_a_malformed_feedback_click_is_acknowledged_and_counts_nothing(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="an answer")
    async with harness.running():
        _, answer = await answered(harness, "one")
        ack = await harness.slack.send_interaction(
            {
                "type": "block_actions",
                "user": {"id": "U1"},
                "container": {"type": "message", "message_ts": answer, "channel_id": "C1"},
                "actions": [
                    {"type": "feedback_buttons", "action_id": "answer_feedback", "value": '{"v": "meh"}'}
                ],
            }
        )
        await harness.settled()
    assert ack == {}
    assert await harness.redis.hgetall(month_key(harness)) == {}
