"""End to end: a mention is answered in a thread by the real bot, streamed through Slack's native API."""

from __future__ import annotations

from tests.conftest import Harness
from tests.fake_slack import BOT_USER_ID


async def test_mention_gets_a_threaded_streamed_answer(harness: Harness) -> None:
    harness.model.script()
    async with harness.running():
        ts = await harness.say("how do I rotate a Redis password?")
        await harness.replies_done(1)
    thread = harness.slack.thread("C1", ts)
    assert [m["user"] for m in thread] == ["U1", BOT_USER_ID]
    assert thread[1]["text"] == "answer 1"
    request = harness.model.requests[0]
    assert request["messages"][0] == {"role": "system", "content": "You are a test bot."}
    assert request["messages"][-1] == {"role": "user", "content": "alice: how do I rotate a Redis password?"}
