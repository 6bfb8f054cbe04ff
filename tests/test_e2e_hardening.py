"""End to end, hostile input and safe output: text that is not valid Unicode, malformed events, events
the bot does not handle, unreadable HTTP bodies, and answers that try to notify a whole channel."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import orjson
import pytest

from bot.slack import WORD_JOINER
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID, TEAM_ID
from tests.procs import free_port
from tests.test_e2e_http import serving_http, signed

BROADCASTS = ("<!channel>", "<!here>", "<!everyone>", "<!subteam^")


def done(messages: list[dict[str, Any]]) -> bool:
    return bool(messages) and all(m["metadata"]["event_payload"]["state"] == "done" for m in messages)


def bot_texts(harness: Harness, channel: str, ts: str) -> list[str]:
    return [m["text"] for m in harness.slack.bot_messages(channel, ts)]


async def test_text_that_is_not_valid_unicode_never_breaks_a_thread(harness: Harness) -> None:
    harness.model.script(Reply(chunks=["Fine ", "\ud800", " here."]), Reply(text="Still fine."))
    async with harness.running():
        ts = await harness.say("what is \ud83d this?")  # a lone surrogate, as Slack's JSON can carry one
        await harness.replies_done(1)
        await harness.say("and again?", thread_ts=ts)
        await harness.replies_done(2)
    first, second = bot_texts(harness, "C1", ts)
    assert first == "Fine \ufffd here." and second == "Still fine."
    raw = await harness.redis.lrange(f"{harness.prefix}{{{TEAM_ID}:C1:{ts}}}:turns", 0, -1)
    assert [orjson.loads(turn)["text"] for turn in raw] == [
        "what is \ufffd this?",
        "Fine \ufffd here.",
        "and again?",
        "Still fine.",
    ]
    assert [m["content"] for m in harness.model.requests[1]["messages"][1:]] == [
        "alice: what is \ufffd this?",
        "Fine \ufffd here.",
        "alice: and again?",
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("text", 42),
        ("ts", "yesterday"),
        ("thread_ts", "../../etc"),
        ("channel", "C1; DROP"),
        ("user", ["U1"]),
    ],
)
async def test_a_malformed_event_is_acknowledged_logged_without_content_and_dropped(
    harness: Harness, caplog: pytest.LogCaptureFixture, field: str, value: object
) -> None:
    caplog.set_level(logging.WARNING, logger="bot")
    event: dict[str, Any] = {
        "type": "app_mention",
        "user": "U1",
        "text": f"<@{BOT_USER_ID}> secret words",
        "channel": "C1",
    }
    event |= {"ts": harness.slack.next_ts(), field: value}
    async with harness.running():
        envelope = await harness.slack.send_event(event)
        await harness.slack.wait_ack(envelope)
        await harness.say("a well-formed question")
        await harness.replies_done(1)
    assert len(harness.model.requests) == 1  # only the well-formed one
    (warning,) = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert field in warning and "secret" not in warning


async def test_every_request_slack_sends_is_acknowledged(harness: Harness) -> None:
    async with harness.running():
        events: list[dict[str, Any]] = [
            {"type": "reaction_added", "user": "U1", "reaction": "tada", "item": {"type": "message"}},
            {"type": "member_joined_channel", "user": "U1", "channel": "C1"},
            {"type": "app_uninstalled"},
        ]
        envelopes = [await harness.slack.send_event(event) for event in events]
        acks = [await harness.slack.wait_ack(envelope) for envelope in envelopes]
        clicked = await harness.slack.send_interaction(
            {"type": "block_actions", "user": {"id": "U1"}, "actions": [{"action_id": "something_old"}]}
        )
        commanded = await harness.slack.send_command("", command="/retired")
    assert len(acks) == 3 and clicked == {} and commanded == {}


async def test_http_mode_answers_a_signed_unreadable_body_with_400_and_an_unsigned_one_with_401(
    harness: Harness,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/slack/events"
    garbage = "{not json"
    async with serving_http(harness.settings(slack_app_token=None), port), aiohttp.ClientSession() as http:
        for _ in range(100):  # until the server listens
            try:
                unsigned = await http.post(url, data=garbage, headers={"Content-Type": "application/json"})
                break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.02)
        malformed = await http.post(url, data=garbage, headers=signed(garbage))
        form = "payload=%7Bbroken"
        form_headers = signed(form) | {"Content-Type": "application/x-www-form-urlencoded"}
        malformed_form = await http.post(url, data=form, headers=form_headers)
    assert (unsigned.status, malformed.status, malformed_form.status) == (401, 400, 400)


async def test_answers_never_notify_a_whole_channel_or_group(harness: Harness) -> None:
    # A prompt injection can make a model write exactly this, split anywhere across chunks.
    pieces = ["Hey <!", "channel> and <!he", "re|here>, @every", "one, <!subteam^S1|@oncall> and <@U2>."]
    harness.model.script(Reply(chunks=pieces), Reply(chunks=pieces))
    async with harness.running():
        native = await harness.say("broadcast please")
        await harness.replies_done(1)
    async with harness.running(stream_mode="update"):
        updated = await harness.say("again")
        await harness.slack.wait_for(
            lambda: len(harness.slack.calls_to("chat.update")) >= 1, what="the answer"
        )
    for ts in (native, updated):
        (text,) = bot_texts(harness, "C1", ts)
        assert not any(mark in text for mark in BROADCASTS) and "@everyone" not in text
        assert text == (
            f"Hey @{WORD_JOINER}channel and @{WORD_JOINER}here, @{WORD_JOINER}everyone, "
            f"@{WORD_JOINER}oncall and <@U2>."
        )
    written = [json.dumps(c.args) for c in harness.slack.calls if c.method.startswith("chat.")]
    assert not any(mark in call for call in written for mark in ("<!channel>", "<!here", "<!subteam"))
