"""End to end, the message shortcuts: "Ask about this message" and "Summarize thread" through their
modal (``message_action`` then ``view_submission``, as Slack sends them), "Translate" at once; answers
in the message's thread or only to whoever asked; budgets, usage and refusals."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml

from bot.shortcuts import EXPIRED, KINDS, NO_QUESTION
from bot.views import START_OVER_SHORTCUT
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import TEAM_ID


def question_values(question: str, *, only_me: bool = False) -> dict[str, Any]:
    chosen = [{"text": {"type": "plain_text", "text": "Only me"}, "value": "only_me"}] if only_me else []
    values: dict[str, Any] = {"only_me": {"choice": {"type": "checkboxes", "selected_options": chosen}}}
    if question:
        values["question"] = {"text": {"type": "plain_text_input", "value": question}}
    return values


async def modal_for(harness: Harness, callback_id: str, ts: str, user: str = "U1") -> dict[str, Any]:
    """``user`` uses a shortcut that asks first; the modal the bot opens for it."""
    opened = len(harness.slack.calls_to("views.open"))
    assert await harness.slack.use_shortcut(callback_id, "C1", ts, user) == {}
    await harness.slack.wait_for(lambda: len(harness.slack.calls_to("views.open")) > opened, what="the modal")
    view: dict[str, Any] = harness.slack.calls_to("views.open")[-1].args["view"]
    assert view["callback_id"] == "shortcut_request"
    return view


def finished(harness: Harness, thread_ts: str) -> list[dict[str, Any]]:
    """The bot's finished messages in a thread of C1."""
    return [
        m
        for m in harness.slack.bot_messages("C1", thread_ts)
        if ((m.get("metadata") or {}).get("event_payload") or {}).get("state") == "done"
    ]


def usage_month(harness: Harness) -> str:
    return f"{harness.prefix}{{{TEAM_ID}:usage}}:{datetime.datetime.now(datetime.UTC):%Y-%m}"


async def test_ask_about_a_message_answers_in_its_thread_with_the_message_and_stores_nothing(
    harness: Harness,
) -> None:
    root = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=root, user="U2", text="The deploy died with exit code 137")
    harness.model.script(Reply(text="Exit code 137 means the process was killed, usually out of memory."))
    async with harness.running():
        view = await modal_for(harness, "ask_about_message", root)
        assert "exit code 137" in view["blocks"][0]["elements"][0]["text"]  # the message, shown
        ack = await harness.slack.submit_view(view, "U1", question_values("What does 137 mean?"))
        assert ack == {}
        await harness.slack.wait_for(lambda: bool(finished(harness, root)), what="the answer in the thread")
        await harness.settled()
    [answer] = finished(harness, root)
    assert answer["text"].startswith("_alice asked about bob's message: “What does 137 mean?”_\n\n")
    assert answer["text"].endswith("usually out of memory.")
    assert any(b.get("type") == "context_actions" for b in answer.get("blocks") or [])  # feedback
    [request] = harness.model.requests
    assert request["messages"][0] == {"role": "system", "content": "You are a test bot."}
    asked = request["messages"][-1]["content"]
    assert asked.startswith("alice: What does 137 mean?")
    assert "from bob]\nThe deploy died with exit code 137" in asked
    assert len(request["messages"]) == 2  # the message and the question; no thread history
    thread = f"{TEAM_ID}:C1:{root}"
    stored = [k async for k in harness.redis.scan_iter(match=f"{harness.prefix}{{{thread}}}:*")]
    assert stored == []  # no turns, no persona pin, no job progress left behind
    assert not [k async for k in harness.redis.scan_iter(match=f"{harness.prefix}*:joined:{thread}")]
    used = await harness.redis.hgetall(usage_month(harness))
    assert int(used["ch:C1:replies"]) == 1 and int(used["u:U1:replies"]) == 1


async def test_ask_only_me_reads_the_messages_files_and_answers_through_the_response_url_alone(
    harness: Harness,
) -> None:
    root = harness.slack.next_ts()
    checklist = b"Release checklist: freeze on Thursday"
    notes = harness.slack.add_file("notes.txt", checklist, "text/plain", "text")
    harness.slack.add_message("C1", ts=root, user="U2", text="Ship it **Friday**?", files=[notes])
    harness.model.script(Reply(text="Fridays are **risky** for releases."))
    async with harness.running():
        view = await modal_for(harness, "ask_about_message", root)
        await harness.slack.submit_view(view, "U1", question_values("Is that wise?", only_me=True))
        await harness.slack.wait_for(lambda: bool(harness.slack.responses("U1")), what="the private answer")
        await harness.settled()
    [response] = harness.slack.calls_to("response_url")
    assert response.args["response_type"] == "ephemeral" and response.args["user"] == "U1"
    assert response.args["text"] == "Fridays are **risky** for releases."
    assert response.args["blocks"] == [{"type": "markdown", "text": response.args["text"]}]  # Markdown
    assert harness.slack.bot_messages("C1", root) == []
    asked = harness.model.requests[0]["messages"][-1]["content"]
    assert "Ship it **Friday**?" in asked and "Release checklist: freeze on Thursday" in asked  # its file
    used = await harness.redis.hgetall(usage_month(harness))
    assert int(used["u:U1:replies"]) == 1


async def test_summarize_thread_reads_the_whole_thread_and_posts_or_tells_only_the_asker(
    harness: Harness,
) -> None:
    root = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=root, user="U2", text="Which database for the new service?")
    reply = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=reply, user="U1", text="Postgres, we know it", thread_ts=root)
    harness.model.script(Reply(text="They chose Postgres."), Reply(text="Postgres it is."))
    async with harness.running():
        view = await modal_for(harness, "summarize_thread", reply, user="U2")  # on a reply: its thread
        assert [b["block_id"] for b in view["blocks"] if b["type"] == "input"] == ["only_me"]
        assert await harness.slack.submit_view(view, "U2", question_values("")) == {}
        await harness.slack.wait_for(lambda: bool(finished(harness, root)), what="the summary")
        view = await modal_for(harness, "summarize_thread", root, user="U1")
        await harness.slack.submit_view(view, "U1", question_values("", only_me=True))
        await harness.slack.wait_for(lambda: bool(harness.slack.responses("U1")), what="the private summary")
        await harness.settled()
    [summary] = finished(harness, root)
    assert summary["text"] == (
        "_A summary of this thread (2 messages), asked for by bob._\n\nThey chose Postgres."
    )
    first, second = (r["messages"][-1]["content"] for r in harness.model.requests)
    assert first.startswith("Summarize this Slack thread for bob")
    assert first.endswith("bob: Which database for the new service?\nalice: Postgres, we know it")
    assert "\nyou (the assistant): _A summary of this thread" in second  # the posted summary, read back
    assert harness.slack.responses("U1") == ["Postgres it is."]


async def test_a_long_thread_is_summarized_from_its_first_message_and_the_newest_that_fit(
    harness: Harness,
) -> None:
    root = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=root, user="U2", text="The plan for the offsite")
    for n in range(300):
        harness.slack.add_message(
            "C1", ts=harness.slack.next_ts(), user="U1", text=f"idea {n}: " + "word " * 20, thread_ts=root
        )
    async with harness.running(max_prompt_tokens=2000):
        view = await modal_for(harness, "summarize_thread", root)
        await harness.slack.submit_view(view, "U1", question_values(""))
        await harness.slack.wait_for(lambda: bool(finished(harness, root)), what="the summary")
    asked = harness.model.requests[0]["messages"][-1]["content"]
    assert "bob: The plan for the offsite\n[" in asked and "idea 299:" in asked and "idea 0:" not in asked
    prelude = finished(harness, root)[0]["text"].split("\n\n")[0]
    assert prelude.startswith("_A summary of this thread (301 messages), asked for by alice. I read its ")
    kept = int(prelude.split("the newest ")[1].split(";")[0])
    assert f"[{300 - kept} messages left out]" in asked and 0 < kept < 300


async def test_translate_answers_only_the_user_in_the_language_of_their_locale(harness: Harness) -> None:
    harness.slack.users["U1"]["locale"] = "fr-FR"
    ts = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=ts, user="U2", text="The meeting moved to Tuesday")
    harness.model.script(Reply(text="La réunion a été déplacée à mardi"))
    async with harness.running():
        assert await harness.slack.use_shortcut("translate_message", "C1", ts, "U1") == {}
        await harness.slack.wait_for(lambda: bool(harness.slack.responses("U1")), what="the translation")
        await harness.settled()
    assert harness.slack.responses("U1") == ["La réunion a été déplacée à mardi"]
    assert harness.slack.calls_to("views.open") == []  # nothing to ask first
    [request] = harness.model.requests
    system, message = request["messages"]
    assert "into French" in system["content"] and message["content"] == "The meeting moved to Tuesday"
    assert harness.slack.bot_messages("C1", ts) == []


async def test_a_shortcut_over_the_channels_budget_is_refused_politely_to_the_user_alone(
    harness: Harness,
) -> None:
    root = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=root, user="U2", text="Please translate me")
    async with harness.running(budget_channel_tokens=5):
        await harness.say("spend the budget", user="U2")  # the first reply may use more than is left
        await harness.replies_done(1)
        await harness.settled()
        await harness.slack.use_shortcut("translate_message", "C1", root, "U1")
        view = await modal_for(harness, "ask_about_message", root)
        await harness.slack.submit_view(view, "U1", question_values("Why?"))
        await harness.slack.wait_for(lambda: len(harness.slack.responses("U1")) == 2, what="two refusals")
        await harness.settled()
    refusal = ":warning: The monthly tokens budget for this channel is used up, so I can't answer now."
    assert [r.split(" It resets")[0] for r in harness.slack.responses("U1")] == [refusal, refusal]
    assert len(harness.model.requests) == 1  # the mention's, none for the shortcuts
    assert harness.slack.bot_messages("C1", root) == []  # refused in private, not in the thread


async def test_the_modal_says_what_is_wrong_and_a_refused_read_is_explained(harness: Harness) -> None:
    root = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=root, user="U2", text="A message")
    async with harness.running():
        view = await modal_for(harness, "ask_about_message", root)
        assert await harness.slack.submit_view(view, "U1", question_values("   ")) == {
            "response_action": "errors",
            "errors": {"question": NO_QUESTION},
        }
        long = await harness.slack.submit_view(view, "U1", question_values("why? " * 500))
        assert "within 2000 characters" in long["errors"]["question"]
        expired = {**view, "private_metadata": "0" * 32}
        assert await harness.slack.submit_view(expired, "U1", question_values("Why?")) == {
            "response_action": "errors",
            "errors": {"only_me": EXPIRED},
        }
        # Slack refuses to let the bot read a thread where it is not a member.
        harness.slack.fail["conversations.replies"] = "not_in_channel"
        view = await modal_for(harness, "summarize_thread", root)
        await harness.slack.submit_view(view, "U1", question_values(""))
        await harness.slack.wait_for(lambda: bool(harness.slack.responses("U1")), what="the explanation")
        # A malformed shortcut (no response URL) is acknowledged and dropped.
        envelope = {"type": "message_action", "callback_id": "translate_message", "user": {"id": "U1"}}
        assert await harness.slack.send_interaction(envelope) == {}
        await harness.settled()
    [explained] = harness.slack.responses("U1")
    assert explained.startswith(":warning: Slack won't let me read this thread here (not_in_channel).")
    assert harness.model.requests == []
    assert harness.slack.bot_messages("C1", root) == []


def test_the_manifests_declare_every_shortcut_the_bot_answers() -> None:
    for path in ("manifest.yaml", "manifest-http.yaml"):
        manifest = yaml.safe_load(Path(path).read_text())
        shortcuts = manifest["features"]["shortcuts"]
        assert sorted(s["callback_id"] for s in shortcuts) == sorted([*KINDS, START_OVER_SHORTCUT])
        assert {s["type"] for s in shortcuts} == {"message"}
        assert manifest["settings"]["interactivity"]["is_enabled"] is True
