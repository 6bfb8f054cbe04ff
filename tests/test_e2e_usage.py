"""End to end, usage and budgets: usage recorded from the API's usage chunk (or estimated), costs from the
price table, /usage, and monthly budgets with the 80% notice, the refusal and concurrent requests."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest

from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import TEAM_ID


def month_key(harness: Harness) -> str:
    return f"{harness.prefix}{{{TEAM_ID}:usage}}:{datetime.datetime.now(datetime.UTC):%Y-%m}"


async def month(harness: Harness) -> dict[str, int]:
    return {str(k): int(v) for k, v in (await harness.redis.hgetall(month_key(harness))).items()}


@pytest.mark.cluster
async def test_usage_is_recorded_per_workspace_channel_user_model_and_day(harness: Harness) -> None:
    harness.model.script(Reply(text="hi", prompt_tokens=100, completion_tokens=20))
    async with harness.running():
        await harness.say("count me")
        await harness.replies_done(1)
    figures = await month(harness)
    for scope in ("all", "ch:C1", "u:U1", "m:gpt-4o-mini"):
        assert (figures[f"{scope}:prompt"], figures[f"{scope}:completion"], figures[f"{scope}:replies"]) == (
            100,
            20,
            1,
        )
        assert figures[f"{scope}:micro_usd"] == 100 * 0.15 + 20 * 0.60  # gpt-4o-mini's default price
    assert "all:estimated" not in figures
    day = f"{harness.prefix}{{{TEAM_ID}:usage}}:{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"
    assert await harness.redis.hget(day, "all:prompt") == "100"


async def test_usage_is_estimated_with_tiktoken_when_the_endpoint_sends_none(
    harness: Harness, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("gpt-4o-mini: {input: 1.0, output: 2.0}\n")
    harness.model.script(Reply(text="an answer of several words", usage=False))
    async with harness.running(prices_file=prices):
        await harness.say("estimate me")
        await harness.replies_done(1)
    figures = await month(harness)
    assert figures["all:estimated"] == 1
    assert figures["all:prompt"] > 10 and 3 <= figures["all:completion"] <= 10
    assert figures["all:micro_usd"] == figures["all:prompt"] * 1 + figures["all:completion"] * 2


async def test_usage_command_shows_the_caller_and_admins_more(harness: Harness) -> None:
    harness.model.script(
        Reply(text="a", prompt_tokens=1000, completion_tokens=500),
        Reply(text="b", prompt_tokens=10, completion_tokens=5),
    )
    async with harness.running(persona_admins="U2"):
        await harness.say("first")
        await harness.replies_done(1)
        await harness.say("second", channel="C2", user="U2")
        await harness.replies_done(2)
        for user in ("U1", "U2"):
            await harness.slack.send_command("", command="/usage", user=user)
        await harness.slack.wait_for(lambda: len(harness.slack.responses()) == 2, what="two reports")
    mine, admin = harness.slack.responses("U1") + harness.slack.responses("U2")
    assert "This channel: 1,500 tokens in 1 replies, about $0.00" in mine and "You: 1,500 tokens" in mine
    assert "Workspace" not in mine
    assert "Workspace: 1,515 tokens in 2 replies" in admin
    assert admin.index("<#C1>") < admin.index("<#C2>")  # top channels, largest first


@pytest.mark.cluster
async def test_budgets_notice_at_80_percent_then_refuse_saying_when_they_reset(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="ok", prompt_tokens=100, completion_tokens=20)
    async with harness.running(budget_channel_tokens=150):
        first = await harness.say("one")
        await harness.replies_done(1)
        await harness.say("two", thread_ts=first)  # 120 of 150 used: over 80%
        await harness.replies_done(2)
        await harness.say("three", thread_ts=first)  # 240 used: spent
        await harness.slack.wait_for(lambda: len(harness.answers()) == 3, what="the refusal")
        await harness.say("four", thread_ts=first)
        await harness.slack.wait_for(lambda: len(harness.answers()) == 4, what="the second refusal")
    one, two, three, four = harness.answers()
    assert one == "ok" and two.startswith("ok\n\n_Note: this channel has used over 80%")
    nxt = (datetime.datetime.now(datetime.UTC).replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
    refusal = "The monthly tokens budget for this channel is used up, so I can't answer now."
    assert three == f":warning: {refusal} It resets on {nxt:%Y-%m-%d}."
    assert four == three
    assert len(harness.model.requests) == 2
    assert (await month(harness))["pending:ch:C1:tokens"] == 0


async def test_a_usd_budget_per_user(harness: Harness) -> None:
    harness.model.default_reply = Reply(text="ok", prompt_tokens=100, completion_tokens=20)  # $0.000027
    async with harness.running(budget_user_usd=0.00002):
        await harness.say("one")
        await harness.replies_done(1)
        await harness.say("two")
        await harness.slack.wait_for(lambda: len(harness.answers()) == 2, what="the refusal")
        await harness.say("from someone else", user="U2")
        await harness.replies_done(2)
    assert "monthly USD budget for this user is used up" in harness.answers()[1]


@pytest.mark.cluster
async def test_two_requests_at_the_edge_overshoot_by_at_most_one_reply(harness: Harness) -> None:
    harness.model.default_reply = Reply(
        text="slow", prompt_tokens=100, completion_tokens=20, first_token_delay=0.5
    )
    async with harness.running(budget_workspace_tokens=150):
        await asyncio.gather(harness.say("a", channel="C1"), harness.say("b", channel="C2"))
        await harness.slack.wait_for(
            lambda: len(harness.answers("C1") + harness.answers("C2")) == 2, what="both"
        )
    answers = sorted(harness.answers("C1") + harness.answers("C2"))
    # The refusal says what is true: nothing is used yet, the other answer holds what is left.
    assert answers[0] == (
        ":warning: What is left of this workspace's monthly tokens budget is held by answers in progress, "
        "so I can't start another one now. Please ask again in a minute."
    )
    assert answers[1] == "slow"
    assert len(harness.model.requests) == 1
    figures = await month(harness)
    assert figures["all:prompt"] + figures["all:completion"] == 120 and figures["pending:all:tokens"] == 0


async def test_a_failed_reply_records_nothing_and_releases_its_reservation(harness: Harness) -> None:
    harness.model.script(Reply(status=500))
    async with harness.running(budget_workspace_tokens=1000):
        await harness.say("fail")
        await harness.replies_done(1)
    figures = await month(harness)
    assert "all:replies" not in figures and figures["pending:all:tokens"] == 0


async def test_replies_reserve_what_they_can_use_not_the_whole_prompt_budget(harness: Harness) -> None:
    # 20,000 tokens a month for the channel, while every reply may use up to MAX_PROMPT_TOKENS (16,000):
    # reserving that would refuse the second of two questions asked at once, at 0% used.
    harness.model.default_reply = Reply(
        text="ok", prompt_tokens=40, completion_tokens=2, first_token_delay=0.5
    )
    async with harness.running(budget_channel_tokens=20_000, max_reply_tokens=500):
        await asyncio.gather(*(harness.say(f"question {i}") for i in range(3)))
        await harness.slack.wait_for(lambda: len(harness.answers()) == 3, what="three answers")
    assert harness.answers() == ["ok", "ok", "ok"]
    assert (await month(harness))["pending:ch:C1:tokens"] == 0
