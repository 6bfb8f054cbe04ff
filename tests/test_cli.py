"""The command line as an operator meets it: bad settings and refused tokens end with one clear message."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from tests.conftest import Harness

SETTINGS_VARS = (
    "SLACK_",
    "OPENAI_",
    "REDIS_",
    "MAX_",
    "STREAM_",
    "HISTORY_",
    "PERSONAS_",
    "SYSTEM_",
    "TOKEN_",
)


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_VARS)}
    return env | values


async def run_bot(env: dict[str, str], *args: str, cwd: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "run",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_bad_settings_stop_start_up_with_every_problem_listed(tmp_path: object) -> None:
    env = clean_env(MAX_PROMPT_TOKENS="lots", STREAM_MODE="sideways", SLACK_APP_TOKEN="not-an-app-token")
    env["PYTHONPATH"] = os.getcwd()
    code, stderr = await run_bot(env, cwd=str(tmp_path))
    assert code == 2
    for name in ("MAX_PROMPT_TOKENS", "STREAM_MODE", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "OPENAI_API_KEY"):
        assert name in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("method", ["auth.test", "apps.connections.open"])
async def test_a_refused_slack_token_stops_the_bot_with_a_clear_message(
    harness: Harness, tmp_path: object, method: str
) -> None:
    harness.slack.fail[method] = "invalid_auth"
    env = clean_env(
        SLACK_BOT_TOKEN="xoxb-revoked",
        SLACK_APP_TOKEN="xapp-test",
        SLACK_API_URL=harness.slack.api_url,
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=harness.model.base_url,
        REDIS_URL=harness.redis_url,
        REDIS_PREFIX=harness.prefix,
        PYTHONPATH=os.getcwd(),
    )
    code, stderr = await run_bot(env, cwd=str(tmp_path))
    assert code == 1
    assert f"{method} failed: invalid_auth" in stderr
    assert "Traceback" not in stderr and "xoxb-revoked" not in stderr
