"""The terminal chat, driven through a pseudo-terminal like a person at a keyboard."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from pathlib import Path

import pexpect

from bot.domain import REPLY_PRIMING_TOKENS, Persona
from bot.personas import FilePersonas, PersonaStore
from bot.tokens import TiktokenCounter
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import TEAM_ID
from tests.procs import clean_env, free_port


async def expect(child: pexpect.spawn[str], pattern: str) -> re.Match[str]:
    # pexpect blocks; the fakes must keep serving on the event loop meanwhile.
    await asyncio.to_thread(child.expect, pattern, timeout=30)
    match = child.match
    assert isinstance(match, re.Match)
    return match


def spawn(harness: Harness, cwd: Path, *args: str, **env: str) -> pexpect.spawn[str]:
    """``slack-gpt-bot chat ARGS`` on a pseudo-terminal, against the fake model and the test's Redis;
    everything it shows is kept in ``child.logfile_read``."""
    values = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": harness.model.base_url,
        "OPENAI_MAX_RETRIES": "0",
        "REDIS_URL": harness.redis_url,
        "REDIS_PREFIX": harness.prefix,
        "PYTHONPATH": os.getcwd(),
        "USER": "tester",
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "bot", "chat", *args],
        env=clean_env(**(values | env)),
        cwd=str(cwd),
        encoding="utf-8",
    )
    child.logfile_read = io.StringIO()
    return child


async def ends(child: pexpect.spawn[str]) -> str:
    """Wait for the chat to exit; everything it showed. It must have exited 0, without a traceback."""
    await asyncio.to_thread(child.expect, pexpect.EOF, timeout=30)
    child.close()
    assert isinstance(child.logfile_read, io.StringIO)
    shown = child.logfile_read.getvalue()
    assert child.exitstatus == 0, shown
    assert "Traceback" not in shown
    return shown


def persona_store(harness: Harness) -> PersonaStore:
    """The bot's persona store on the test's Redis: what `/persona` writes to in Slack."""
    files = FilePersonas.load("You are a test bot.", None)
    return PersonaStore(harness.redis, files, prefix=harness.prefix, thread_ttl_seconds=3600)


async def test_a_terminal_conversation_with_a_persona_history_and_usage(
    harness: Harness, tmp_path: Path
) -> None:
    personas = tmp_path / "personas.yaml"
    personas.write_text("personas:\n  pirate:\n    system_prompt: You are a pirate.\n")
    harness.model.script(
        Reply(text="Ahoy, matey!", prompt_tokens=30, completion_tokens=4),
        Reply(text="Still a pirate.", prompt_tokens=50, completion_tokens=4),
    )
    child = spawn(harness, tmp_path, "--persona", "pirate", PERSONAS_FILE=str(personas))
    try:
        await expect(child, "persona 'pirate'")
        await expect(child, "you> ")
        child.sendline("hello there")
        await expect(child, "Ahoy, matey!")
        await expect(child, r"\[30 prompt \+ 4 completion tokens, about \$0\.0000\]")
        await expect(child, "you> ")
        child.sendline("are you still a pirate?")
        await expect(child, "Still a pirate.")
        await expect(child, "you> ")
        child.sendline("/exit")
        await ends(child)
    finally:
        child.close()
    first, second = harness.model.requests
    assert first["messages"] == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "tester: hello there"},
    ]
    assert [m["content"] for m in second["messages"][1:]] == [
        "tester: hello there",
        "Ahoy, matey!",
        "tester: are you still a pirate?",
    ]
    # The session is a thread of the `terminal` channel in the local workspace, its ts marked terminal.
    keys = [
        key
        async for key in harness.redis.scan_iter(match=f"{harness.prefix}{{local:terminal:terminal:*}}:turns")
    ]
    assert len(keys) == 1 and await harness.redis.llen(keys[0]) == 4


async def test_ctrl_c_at_the_prompt_leaves_cleanly(harness: Harness, tmp_path: Path) -> None:
    child = spawn(harness, tmp_path)
    try:
        await expect(child, "Ctrl-C to leave")
        await expect(child, "you> ")
        child.sendintr()
        await ends(child)
    finally:
        child.close()
    assert harness.model.requests == []


async def test_ctrl_c_during_an_answer_stops_it_and_the_conversation_goes_on(
    harness: Harness, tmp_path: Path
) -> None:
    story = [f"line {i}. " for i in range(1, 41)]
    harness.model.script(
        Reply(chunks=story, chunk_delay=0.25),
        Reply(text="A short one.", prompt_tokens=9, completion_tokens=3),
    )
    child = spawn(harness, tmp_path)
    try:
        await expect(child, "you> ")
        child.sendline("tell me a long story")
        await expect(child, "line 2. ")
        child.sendintr()
        await expect(child, r"\[stopped\]")
        await expect(child, "you> ")
        child.sendline("a short one then")
        await expect(child, "A short one.")
        await expect(child, r"\[9 prompt \+ 3 completion tokens, about \$0\.0000\]")
        await expect(child, "you> ")
        child.sendintr()  # the second Ctrl-C, at the prompt: leave
        shown = await ends(child)
    finally:
        child.close()
    assert "line 40." not in shown
    # No usage line for the stopped answer: its usage is not recorded either.
    assert shown.count("completion tokens") == 1
    # The stopped answer was not stored; its question was, as after a failed answer.
    second = harness.model.requests[1]
    assert [m["content"] for m in second["messages"][1:]] == [
        "tester: tell me a long story",
        "tester: a short one then",
    ]


async def test_an_unreachable_endpoint_is_named_and_warnings_go_to_the_log_file(
    harness: Harness, tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    data = tmp_path / "state"
    child = spawn(harness, tmp_path, OPENAI_BASE_URL=down, DATA_DIR=str(data))
    try:
        await expect(child, re.escape(f"Logs go to {data / 'chat.log'}."))
        await expect(child, "you> ")
        child.sendline("hello?")
        await expect(
            child,
            r"\[!\] The model service is unavailable at the moment\. Please try again shortly\. "
            rf"Could not connect to {re.escape(down)} \(OPENAI_BASE_URL\): check that the server is running",
        )
        await expect(child, "you> ")
        child.sendline("/exit")
        shown = await ends(child)
    finally:
        child.close()
    # The pipeline's warning went to the log file, not between the lines of the conversation.
    assert "WARNING" not in shown
    assert "WARNING bot.conversation: model failed" in (data / "chat.log").read_text()


async def test_usage_is_counted_and_marked_estimated_when_the_endpoint_sends_none(
    harness: Harness, tmp_path: Path, counter: TiktokenCounter
) -> None:
    harness.model.script(Reply(text="Counted by hand, as it were.", usage=False))
    child = spawn(harness, tmp_path)
    try:
        await expect(child, "you> ")
        child.sendline("how many tokens?")
        await expect(child, "Counted by hand, as it were.")
        line = await expect(child, r"\[(\d+) prompt \+ (\d+) completion tokens \(estimated\), about \$")
        await expect(child, "you> ")
        child.sendline("/exit")
        await ends(child)
    finally:
        child.close()
    messages = harness.model.requests[0]["messages"]
    prompt = sum(counter.message_tokens(m["role"], m["content"]) for m in messages) + REPLY_PRIMING_TOKENS
    completion = counter.count("Counted by hand, as it were.")
    assert (int(line.group(1)), int(line.group(2))) == (prompt, completion)


async def test_the_bot_tokens_workspace_gives_the_personas_made_in_slack(
    harness: Harness, tmp_path: Path
) -> None:
    store = persona_store(harness)
    await store.save_named(TEAM_ID, Persona("parrot", "You repeat everything."))
    channel_persona = Persona("custom", "You speak for channel C42.")
    await store.assign(TEAM_ID, "C42", channel_persona, by="U1", action="set")
    harness.model.script(Reply(text="For C42."), Reply(text="Polly."))
    slack = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_API_URL": harness.slack.api_url}
    for args, answer in ((["--channel", "C42"], "For C42."), (["--persona", "parrot"], "Polly.")):
        child = spawn(harness, tmp_path, *args, **slack)
        try:
            await expect(child, f"in workspace {TEAM_ID}")
            await expect(child, "you> ")
            child.sendline("who are you?")
            await expect(child, re.escape(answer))
            await expect(child, "you> ")
            child.sendline("/exit")
            await ends(child)
        finally:
            child.close()
    prompts = [request["messages"][0]["content"] for request in harness.model.requests]
    assert prompts == ["You speak for channel C42.", "You repeat everything."]
    assert len(harness.slack.calls_to("auth.test")) == 2
    # The session with --channel is a thread of that channel, kept apart from Slack's by its ts.
    pattern = f"{harness.prefix}{{{TEAM_ID}:C42:terminal:*}}:turns"
    assert len([key async for key in harness.redis.scan_iter(match=pattern)]) == 1


async def test_the_team_option_wins_over_the_bot_token(harness: Harness, tmp_path: Path) -> None:
    await persona_store(harness).save_named("T0002", Persona("owl", "You hoot."))
    harness.model.script(Reply(text="Hoo."))
    slack = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_API_URL": harness.slack.api_url}
    child = spawn(harness, tmp_path, "--team", "T0002", "--persona", "owl", **slack)
    try:
        await expect(child, "in workspace T0002, channel terminal, with persona 'owl'")
        await expect(child, "you> ")
        child.sendline("who?")
        await expect(child, "Hoo.")
        await expect(child, "you> ")
        child.sendline("/exit")
        await ends(child)
    finally:
        child.close()
    assert harness.model.requests[0]["messages"][0]["content"] == "You hoot."
    assert harness.slack.calls_to("auth.test") == []
