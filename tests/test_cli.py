"""The command line as an operator meets it: bad settings and refused tokens end with one clear message."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

from bot.ingress import EVENTS_PATH
from bot.settings import Settings
from bot.slack import REQUIRED_SCOPES
from tests.conftest import Harness
from tests.procs import PrivateRedisCluster, clean_env, free_port


async def test_bad_settings_stop_start_up_with_every_problem_listed(tmp_path: object) -> None:
    env = clean_env(
        MAX_PROMPT_TOKENS="lots",
        STREAM_MODE="sideways",
        SLACK_APP_TOKEN="not-an-app-token",
        REDIS_CLUSTER="true",
    )
    env["PYTHONPATH"] = os.getcwd()
    code, stderr = await run_command(env, "run", cwd=str(tmp_path))
    assert code == 2
    for name in ("MAX_PROMPT_TOKENS", "STREAM_MODE", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "OPENAI_API_KEY"):
        assert name in stderr
    assert "REDIS_CLUSTER is true but REDIS_URL is not a redis:// or rediss:// address" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("bot token refused", "Slack refused SLACK_BOT_TOKEN (invalid_auth): copy the Bot User OAuth Token"),
        ("app token refused", "Slack refused SLACK_APP_TOKEN (invalid_auth): create an app-level token"),
        ("scope missing", "the bot token lacks the scopes commands: add them under 'OAuth & Permissions'"),
        ("connection refused", "cannot reach Slack at SLACK_API_URL http://127.0.0.1:1/api/: the connection"),
        ("name unknown", "cannot reach Slack at SLACK_API_URL http://slack.invalid/api/: the host name"),
        ("redis refused", "cannot reach REDIS_URL redis://:***@127.0.0.1:1/0 (Redis failed while connecting"),
    ],
)
async def test_every_start_up_failure_is_one_line_naming_what_to_fix(
    harness: Harness, tmp_path: object, failure: str, expected: str
) -> None:
    env = harness.env(SLACK_BOT_TOKEN="xoxb-revoked")
    if failure == "bot token refused":
        harness.slack.fail["auth.test"] = "invalid_auth"
    elif failure == "app token refused":
        harness.slack.fail["apps.connections.open"] = "invalid_auth"
    elif failure == "scope missing":
        harness.slack.scopes.remove("commands")
    elif failure == "connection refused":
        env["SLACK_API_URL"] = "http://127.0.0.1:1/api/"
    elif failure == "name unknown":
        env["SLACK_API_URL"] = "http://slack.invalid/api/"
    elif failure == "redis refused":
        env["REDIS_URL"] = "redis://:hunter2@127.0.0.1:1/0"
    code, output = await run_command(env, "run", cwd=str(tmp_path))
    # Log lines start with their time; what is left is what the operator is told.
    told = [line for line in output.splitlines() if not line[:4].isdigit()]
    assert code == 1
    assert len(told) == 1 and told[0].startswith("The bot cannot start: ") and expected in told[0], output
    assert "Traceback" not in output and "xoxb-revoked" not in output and "hunter2" not in output


@pytest.mark.parametrize("command", ["run", "worker"])
async def test_a_port_already_taken_is_one_line_naming_the_option(
    harness: Harness, tmp_path: Path, command: str
) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        code, output = await run_command(
            harness.env(), command, "--host", "127.0.0.1", "--metrics-port", str(port), cwd=str(tmp_path)
        )
    told = [line for line in output.splitlines() if not line[:4].isdigit()]
    assert code == 1
    assert told == [
        f"The bot cannot start: cannot listen on 127.0.0.1:{port} (Address already in use): "
        "free the port or choose another --metrics-port"
    ], output


async def test_env_example_copied_unchanged_is_refused_with_what_to_set(tmp_path: Path) -> None:
    shutil.copy(".env.example", tmp_path / ".env")
    code, output = await run_command(clean_env(PYTHONPATH=os.getcwd()), "run", cwd=str(tmp_path))
    assert code == 2
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "OPENAI_API_KEY"):
        assert f"{name} is still .env.example's placeholder" in output
    assert "Traceback" not in output


def test_env_example_lists_every_setting() -> None:
    listed = {line.split("=", 1)[0] for line in Path(".env.example").read_text().splitlines() if "=" in line}
    settings = {name.upper() for name in Settings.model_fields}
    assert settings - listed == set()
    assert listed - settings == set()


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


@pytest.mark.cluster
@pytest.mark.parametrize("model_lookup", [True, False], ids=["openai", "listing-only-like-vllm"])
async def test_check_passes_when_everything_is_in_place(
    harness: Harness, tmp_path: object, model_lookup: bool
) -> None:
    harness.model.model_lookup = model_lookup
    code, output = await run_command(harness.env(), "check", cwd=str(tmp_path))
    lines = output.strip().splitlines()
    assert code == 0, output
    (redis_line,) = [line for line in lines if line.startswith("ok   redis")]
    if harness.cluster:
        assert "a cluster (from redis://127.0.0.1:" in redis_line
        assert "3 primaries and 0 replicas, all answering; writable" in redis_line
    else:
        assert "a single server" in redis_line and "is reachable and writable" in redis_line
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


async def test_check_names_the_cluster_node_that_does_not_answer(harness: Harness, tmp_path: Path) -> None:
    cluster = PrivateRedisCluster(tmp_path / "cluster")
    cluster.start()
    try:
        cluster.kill_node(2)
        env = harness.env(REDIS_URL=cluster.url, REDIS_CLUSTER="true")
        code, output = await run_command(env, "check", cwd=str(tmp_path))
    finally:
        cluster.stop()
    (redis_line,) = [line for line in output.splitlines() if line.startswith("FAIL redis")]
    assert code == 1
    assert f"1 of 3 cluster nodes do not answer: 127.0.0.1:{cluster.ports[2]}" in redis_line, output
    assert "Traceback" not in output


@pytest.mark.parametrize("path", ["manifest.yaml", "manifest-http.yaml"])
def test_the_manifests_ask_for_exactly_the_scopes_check_expects(path: str) -> None:
    manifest = yaml.safe_load(Path(path).read_text())
    assert sorted(manifest["oauth_config"]["scopes"]["bot"]) == sorted(REQUIRED_SCOPES)


def test_the_http_manifest_sends_events_commands_and_interactivity_to_the_events_path() -> None:
    socket, http = (
        yaml.safe_load(Path(path).read_text()) for path in ("manifest.yaml", "manifest-http.yaml")
    )
    settings = http["settings"]
    assert settings["socket_mode_enabled"] is False and socket["settings"]["socket_mode_enabled"] is True
    assert (
        settings["event_subscriptions"]["bot_events"]
        == socket["settings"]["event_subscriptions"]["bot_events"]
    )
    urls = [settings["event_subscriptions"]["request_url"], settings["interactivity"]["request_url"]]
    urls += [command["url"] for command in http["features"]["slash_commands"]]
    assert len(urls) == 2 + len(socket["features"]["slash_commands"])
    assert all(url.startswith("https://") and url.endswith(EVENTS_PATH) for url in urls)
