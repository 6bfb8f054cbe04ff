"""End to end, an upgrade: keys an earlier version wrote under its names (before they shared hash tags
for Redis Cluster) are renamed as the bot starts, and the bot goes on with them: the channel's persona
and its history, the month's usage, and the threads it takes part in."""

from __future__ import annotations

import datetime

from bot.domain import ThreadKey
from bot.jobs import joined_key, stream_of
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import TEAM_ID
from tests.test_e2e_personas import ask, persona


async def test_an_earlier_versions_keys_are_renamed_and_the_bot_goes_on_with_them(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="An answer.")
    harness.slack.members["C1"] = ["U1"]
    thread = next(ts for ts in iter(harness.slack.next_ts, None) if stream_of(ThreadKey(TEAM_ID, "C1", ts)))
    key = ThreadKey(TEAM_ID, "C1", thread)
    now = datetime.datetime.now(datetime.UTC)
    p, month, day = harness.prefix, f"{now:%Y-%m}", f"{now:%Y-%m-%d}"
    # Today's names, and the ones the earlier version gave the same keys.
    renamed = {
        f"{p}{{{TEAM_ID}:persona:C1}}:channel": f"{p}persona:{TEAM_ID}:channel:C1",
        f"{p}{{{TEAM_ID}:persona:C1}}:audit": f"{p}persona:{TEAM_ID}:audit:C1",
        f"{p}{{{TEAM_ID}:usage}}:{month}": f"{p}usage:{TEAM_ID}:{month}",
        f"{p}{{{TEAM_ID}:usage}}:{day}": f"{p}usage:{TEAM_ID}:{day}",
        joined_key(p, TEAM_ID, key): f"{p}{{{TEAM_ID}:jobs}}:joined:{TEAM_ID}:C1:{thread}",
    }
    async with harness.running():
        await ask(harness, "the first question", ts=thread)
        await persona(harness, "set You are the old version's persona.")
    for new, old in renamed.items():
        await harness.redis.rename(new, old)  # as the earlier version left them
    await harness.redis.delete(f"{p}{{{TEAM_ID}:schema}}")

    async with harness.running():
        follow_up = await ask(harness, "and a follow-up, with no mention", thread_ts=thread, mention=False)
        elsewhere = await ask(harness, "a new question")
        history = await persona(harness, "history")
    assert follow_up["messages"][-1]["content"].endswith("and a follow-up, with no mention")
    assert elsewhere["messages"][0]["content"] == "You are the old version's persona."
    assert "<@U1> set: *default* → *custom*" in history
    assert [await harness.redis.exists(old) for old in renamed.values()] == [0] * len(renamed)
    used = await harness.redis.hgetall(f"{p}{{{TEAM_ID}:usage}}:{month}")
    assert int(used["all:replies"]) == 3  # one before the upgrade, two after
    assert int((await harness.redis.hgetall(f"{p}{{{TEAM_ID}:usage}}:{day}"))["all:replies"]) == 3
