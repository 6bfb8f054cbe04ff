"""The command line as an operator meets it: bad settings and refused tokens end with one clear message."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import yaml

from bot.slack import REQUIRED_SCOPES
from tests.conftest import Harness
from tests.procs import clean_env


async def test_bad_settings_stop_start_up_with_every_problem_listed(tmp_path: object) -> None:
    env = clean_env(MAX_PROMPT_TOKENS="lots", STREAM_MODE="sideways", SLACK_APP_TOKEN="not-an-app-token")
    env["PYTHONPATH"] = os.getcwd()
    code, stderr = await run_command(env, "run", cwd=str(tmp_path))
    assert code == 2
    for name in ("MAX_PROMPT_TOKENS", "STREAM_MODE", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "OPENAI_API_KEY"):
        assert name in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("method", ["auth.test", "apps.connections.open"])
async def test_a_refused_slack_token_stops_the_bot_with_a_clear_message(
    harness: Harness, tmp_path: object, method: str
) -> None:
    harness.slack.fail[method] = "invalid_auth"
    env = harness.env(SLACK_BOT_TOKEN="xoxb-revoked")
    code, stderr = await run_command(env, "run", cwd=str(tmp_path))
    assert code == 1
    assert f"{method} failed: invalid_auth" in stderr
    assert "Traceback" not in stderr and "xoxb-revoked" not in stderr


async def run_command(env: dict[str, str], *args: str, cwd: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_models_lists_the_endpoints_models_with_the_one_in_use_marked(
    harness: Harness, tmp_path: object
) -> None:
    harness.model.models = ["gpt-4o", "gpt-4o-mini", "o3-mini"]
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=harness.model.base_url, PYTHONPATH=os.getcwd())
    code, output = await run_command(env, "models", cwd=str(tmp_path))
    assert code == 0
    assert output.splitlines() == ["  gpt-4o", "* gpt-4o-mini", "  o3-mini"]
    down = env | {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}
    code, output = await run_command(down, "models", cwd=str(tmp_path))
    assert code == 1 and "unavailable" in output and "Traceback" not in output


async def test_check_passes_when_everything_is_in_place(harness: Harness, tmp_path: object) -> None:
    code, output = await run_command(harness.env(), "check", cwd=str(tmp_path))
    lines = output.strip().splitlines()
    assert code == 0, output
    assert [line.split(":")[0] for line in lines if not line.startswith(("2", " "))] == [
        "ok   settings",
        "ok   tokenizer",
        "ok   slack token",
        "ok   slack mode",
        "ok   redis",
        "ok   model endpoint",
        "ok   model gpt-4o-mini",
    ]


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("scope", "FAIL slack token: missing scopes commands"),
        ("app token", "FAIL slack mode: Slack apps.connections.open failed: invalid_auth"),
        ("redis", "FAIL redis:"),
        ("endpoint", "FAIL model endpoint:"),
        ("model", "FAIL model nope: the endpoint does not have this model"),
        ("persona model", "FAIL model ghost-model: the endpoint does not have this model"),
        ("settings", "FAIL settings: MAX_PROMPT_TOKENS"),
    ],
)
async def test_check_names_each_failure_and_exits_non_zero(
    harness: Harness, tmp_path: Path, failure: str, expected: str
) -> None:
    env = harness.env()
    if failure == "scope":
        harness.slack.scopes.remove("commands")
    elif failure == "app token":
        harness.slack.fail["apps.connections.open"] = "invalid_auth"
    elif failure == "redis":
        env["REDIS_URL"] = "redis://127.0.0.1:1"
    elif failure == "endpoint":
        env["OPENAI_BASE_URL"] = "http://127.0.0.1:1/v1"
    elif failure == "model":
        env["OPENAI_MODEL"] = "nope"
    elif failure == "persona model":
        personas = tmp_path / "personas.yaml"
        personas.write_text("personas:\n  ghost:\n    system_prompt: Boo.\n    model: ghost-model\n")
        env["PERSONAS_FILE"] = str(personas)
    elif failure == "settings":
        env["MAX_PROMPT_TOKENS"] = "lots"
    code, output = await run_command(env, "check", cwd=str(tmp_path))
    assert code == 1
    assert any(line.startswith(expected) for line in output.splitlines()), output
    assert "Traceback" not in output


def test_the_manifest_asks_for_exactly_the_scopes_check_expects() -> None:
    manifest = yaml.safe_load(Path("manifest.yaml").read_text())
    assert sorted(manifest["oauth_config"]["scopes"]["bot"]) == sorted(REQUIRED_SCOPES)
