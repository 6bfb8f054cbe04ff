"""End to end, the reply: model errors told to users, cut-off notes, splitting, stream modes, personas."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bot.errors import ModelError
from bot.slack import MESSAGE_LIMIT
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID


def bot_texts(harness: Harness, channel: str, ts: str) -> list[str]:
    return [m["text"] for m in harness.slack.thread(channel, ts) if m.get("user") == BOT_USER_ID]


@pytest.mark.parametrize(
    ("replies", "kind", "overrides"),
    [
        ([Reply(status=401, error_code="invalid_api_key")], "auth", {}),
        (
            [Reply(status=429, error_code="rate_limit_exceeded", headers={"retry-after-ms": "10"})] * 2,
            "rate_limit",
            {"openai_max_retries": 1},
        ),
        ([Reply(status=500)], "unavailable", {}),
        ([Reply(text="slow", first_token_delay=2.0)], "timeout", {"openai_timeout_seconds": 0.3}),
        ([Reply(status=400, error_code="context_length_exceeded")] * 2, "context_length", {}),
        ([Reply(status=404, error_code="model_not_found")], "model_not_found", {}),
    ],
    ids=["auth", "rate-limit-after-retries", "server-error", "timeout", "context-length", "no-such-model"],
)
async def test_model_errors_are_told_in_the_thread_and_the_bot_keeps_answering(
    harness: Harness, replies: list[Reply], kind: str, overrides: dict[str, Any]
) -> None:
    harness.model.script(*replies, Reply(text="recovered"))
    async with harness.running(**overrides):
        ts = await harness.say("first try")
        await harness.replies_done(1)
        await harness.say("second try", thread_ts=ts)
        await harness.replies_done(2)
    first, second = bot_texts(harness, "C1", ts)
    assert first == f":warning: {ModelError(kind).user_message}"  # type: ignore[arg-type]
    assert "Traceback" not in first and "Error code" not in first
    assert second == "recovered"
    # No answer was stored for the failed turn: the retry sees the unanswered question, not the warning.
    last = harness.model.requests[-1]["messages"]
    assert [m["content"] for m in last[1:]] == ["alice: first try", "alice: second try"]


async def test_rate_limit_is_retried_honouring_retry_after(harness: Harness) -> None:
    harness.model.script(Reply(status=429, headers={"retry-after-ms": "20"}), Reply(text="made it"))
    async with harness.running(openai_max_retries=2):
        ts = await harness.say("please")
        await harness.replies_done(1)
    assert bot_texts(harness, "C1", ts) == ["made it"]
    assert len(harness.model.requests) == 2


async def test_context_length_exceeded_is_retried_once_with_a_smaller_context(harness: Harness) -> None:
    harness.model.script(
        Reply(text="one"), Reply(status=400, error_code="context_length_exceeded"), Reply(text="ok")
    )
    async with harness.running(max_prompt_tokens=4000):
        ts = await harness.say("x " * 3000)
        await harness.replies_done(1)
        await harness.say("again", thread_ts=ts)
        await harness.replies_done(2)
    assert bot_texts(harness, "C1", ts) == ["one", "ok"]
    too_long, retried = harness.model.requests[1]["messages"], harness.model.requests[2]["messages"]
    assert len(retried) < len(too_long)  # half the budget no longer holds the long first question
    assert retried[-1]["content"] == "alice: again"


async def test_a_stream_broken_midway_keeps_the_text_and_says_what_happened(harness: Harness) -> None:
    harness.model.script(Reply(chunks=["partial ", "answer ", "never"], fail_after_chunks=2))
    async with harness.running():
        ts = await harness.say("go")
        await harness.replies_done(1)
    (text,) = bot_texts(harness, "C1", ts)
    assert text.startswith("partial answer")
    assert text.endswith(ModelError("unavailable").user_message)


async def test_an_answer_cut_at_the_token_limit_says_so(harness: Harness) -> None:
    harness.model.script(Reply(text="This is the start of a long", finish_reason="length"))
    async with harness.running():
        ts = await harness.say("tell me everything")
        await harness.replies_done(1)
    (text,) = bot_texts(harness, "C1", ts)
    assert text.startswith("This is the start of a long\n\n_")
    assert "cut off" in text and text.endswith("_")


def long_markdown() -> str:
    parts = []
    for i in range(40):
        parts.append(f"## Section {i}\n\n" + f"Paragraph {i} explains things. " * 12)
        if i % 5 == 0:
            parts.append("```python\n" + "".join(f"value_{i}_{j} = {j}\n" for j in range(120)) + "```")
    return "\n\n".join(parts)


@pytest.mark.parametrize("mode", ["native", "update", "off"])
async def test_a_reply_longer_than_one_message_is_split_outside_code_blocks(
    harness: Harness, mode: str
) -> None:
    answer = long_markdown()
    assert len(answer) > 2 * MESSAGE_LIMIT
    harness.model.script(Reply(text=answer, chunk_size=400))
    async with harness.running(stream_mode=mode):
        ts = await harness.say("write a lot")
        await harness.slack.wait_for(
            lambda: (
                "".join(bot_texts(harness, "C1", ts)).count("Section 39") == 1
                and (mode != "native" or harness.stream_stops() >= 3)
            ),
            what="the whole answer",
        )
    messages = bot_texts(harness, "C1", ts)
    assert len(messages) >= 3
    for message in messages:
        assert len(message) <= MESSAGE_LIMIT
        assert (
            len(re.findall(r"^```", message, flags=re.M)) % 2 == 0
        )  # every code block closed in its message
    assert "".join(messages) == answer


async def test_native_streaming_refused_falls_back_to_post_and_update(harness: Harness) -> None:
    harness.slack.fail["chat.startStream"] = "not_allowed_token_type"
    harness.model.script(Reply(chunks=[f"word{i} " for i in range(30)], chunk_delay=0.08))
    async with harness.running():
        ts = await harness.say("stream please")
        await harness.slack.wait_for(
            lambda: bot_texts(harness, "C1", ts) == ["".join(f"word{i} " for i in range(30))],
            what="full text",
        )
        # Remembered per channel: the next reply there posts directly.
        await harness.say("again", thread_ts=ts)
        await harness.slack.wait_for(lambda: len(bot_texts(harness, "C1", ts)) == 2, what="second answer")
    assert len(harness.slack.calls_to("chat.startStream")) == 1
    posts, updates = harness.slack.calls_to("chat.postMessage"), harness.slack.calls_to("chat.update")
    assert len(posts) == 2
    # A 2.4-second stream is shown with at most one edit a second (plus the final one).
    first_ts = next(m["ts"] for m in harness.slack.thread("C1", ts) if m.get("user") == BOT_USER_ID)
    first_updates = [u for u in updates if u.args["ts"] == first_ts]
    assert 1 <= len(first_updates) <= 4


async def test_a_thinking_status_slack_refused_is_not_asked_again_in_that_channel(harness: Harness) -> None:
    harness.slack.fail["assistant.threads.setStatus"] = "channel_type_not_supported"
    async with harness.running():
        ts = await harness.say("first")
        await harness.replies_done(1)
        await harness.say("second", thread_ts=ts)
        await harness.replies_done(2)
        del harness.slack.fail["assistant.threads.setStatus"]
        harness.slack.fail_http("assistant.threads.setStatus", 500, times=10)
        other = await harness.say("elsewhere", channel="C2")
        await harness.replies_done(3)
        await harness.say("and again", channel="C2", thread_ts=other)
        await harness.replies_done(4)
    statuses = [c.args["channel_id"] for c in harness.slack.calls_to("assistant.threads.setStatus")]
    # Refused once in C1: asked once. Failing (a 500, retried) in C2 is no refusal: asked each time.
    assert statuses.count("C1") == 1 and statuses.count("C2") >= 2
    assert len(bot_texts(harness, "C1", ts)) == 2 and len(bot_texts(harness, "C2", other)) == 2


async def test_persona_per_channel_sends_only_the_parameters_it_sets(
    harness: Harness, tmp_path: Path
) -> None:
    personas = tmp_path / "personas.yaml"
    personas.write_text(
        "personas:\n"
        "  pirate:\n"
        "    system_prompt: You are a pirate.\n"
        "    model: gpt-4o\n"
        "    temperature: 0.9\n"
        "    stop: ['END']\n"
        "channels:\n"
        "  C2: pirate\n"
    )
    async with harness.running(personas_file=personas):
        await harness.say("ahoy?", channel="C2")
        await harness.replies_done(1)
        await harness.say("hello?", channel="C1")
        await harness.replies_done(2)
    pirate, default = harness.model.requests
    assert pirate["messages"][0] == {"role": "system", "content": "You are a pirate."}
    assert (pirate["model"], pirate["temperature"], pirate["stop"]) == ("gpt-4o", 0.9, ["END"])
    assert (
        "top_p" not in pirate and "presence_penalty" not in pirate and "max_completion_tokens" not in pirate
    )
    assert default["messages"][0]["content"] == "You are a test bot."
    assert default["model"] == "gpt-4o-mini"
    sent = set(default) - {"model", "messages", "stream", "stream_options"}
    assert sent == {"safety_identifier"}  # the end user, hashed: see test_e2e_model.py


async def test_a_native_stream_that_breaks_midway_is_finished_with_chat_update(harness: Harness) -> None:
    harness.slack.fail["chat.appendStream"] = "message_not_in_streaming_state"
    words = [f"w{i} " for i in range(25)]
    harness.model.script(Reply(chunks=words, chunk_delay=0.1))
    async with harness.running():
        ts = await harness.say("stream and break")
        await harness.slack.wait_for(
            lambda: bot_texts(harness, "C1", ts) == ["".join(words)], what="full text"
        )
    assert len(harness.slack.calls_to("chat.startStream")) == 1
    last = harness.slack.calls_to("chat.update")[-1].args  # the finished answer, with its feedback buttons
    assert last["text"] == "".join(words)
    assert [b["type"] for b in last["blocks"]] == ["markdown", "context_actions"]
    assert last["blocks"][0]["text"] == "".join(words)
