"""The terminal chat, driven through a pseudo-terminal like a person at a keyboard."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pexpect

from tests.conftest import Harness
from tests.fake_model import Reply
from tests.procs import clean_env


async def expect(child: pexpect.spawn, pattern: str) -> None:
    # pexpect blocks; the fake model must keep serving on the event loop meanwhile.
    await asyncio.to_thread(child.expect, pattern, timeout=30)


async def test_a_terminal_conversation_with_a_persona_history_and_usage(
    harness: Harness, tmp_path: Path
) -> None:
    personas = tmp_path / "personas.yaml"
    personas.write_text("personas:\n  pirate:\n    system_prompt: You are a pirate.\n")
    harness.model.script(
        Reply(text="Ahoy, matey!", prompt_tokens=30, completion_tokens=4),
        Reply(text="Still a pirate.", prompt_tokens=50, completion_tokens=4),
    )
    env = clean_env(
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=harness.model.base_url,
        REDIS_URL=harness.redis_url,
        REDIS_PREFIX=harness.prefix,
        PERSONAS_FILE=str(personas),
        PYTHONPATH=os.getcwd(),
        USER="tester",
    )
    child = pexpect.spawn(
        sys.executable,
        ["-m", "bot", "chat", "--persona", "pirate"],
        env=env,
        cwd=str(tmp_path),
        encoding="utf-8",
    )
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
        await asyncio.to_thread(child.expect, pexpect.EOF, timeout=30)
    finally:
        child.close()
    assert child.exitstatus == 0
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
    # The session's history lives in Redis under the local namespace.
    keys = [key async for key in harness.redis.scan_iter(match=f"{harness.prefix}{{local:terminal:*}}:turns")]
    assert len(keys) == 1 and await harness.redis.llen(keys[0]) == 4
