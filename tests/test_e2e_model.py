"""End to end, the model side: every chat parameter from the settings and personas, the hashed end
user, organisation and project headers, Azure OpenAI, and timeouts between chunks."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

from bot.errors import ModelError
from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID, TEAM_ID

EVERY_PARAMETER: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "stop": ["END", "STOP"],
    "logit_bias": {"1234": -100},
    "seed": 42,
    "reasoning_effort": "low",
    "service_tier": "flex",
    "max_reply_tokens": 300,
}


async def one_request(harness: Harness, text: str = "hi", **overrides: Any) -> tuple[dict[str, Any], int]:
    async with harness.running(**overrides):
        await harness.say(text)
        await harness.replies_done(1)
    return harness.model.requests[0], 0


async def test_every_parameter_set_in_the_settings_is_sent(harness: Harness) -> None:
    request, _ = await one_request(harness, **EVERY_PARAMETER)
    expected = {k: v for k, v in EVERY_PARAMETER.items() if k != "max_reply_tokens"}
    assert {k: request[k] for k in expected} == expected
    assert request["max_completion_tokens"] == 300 and "max_tokens" not in request


async def test_a_persona_overrides_the_settings_and_max_tokens_param_renames(
    harness: Harness, tmp_path: Path
) -> None:
    personas = tmp_path / "personas.yaml"
    personas.write_text(
        "personas:\n  cold:\n    system_prompt: Be exact.\n    temperature: 0.1\n    seed: 7\n"
        "    max_tokens: 50\n    logit_bias: {'99': 5}\nchannels:\n  C1: cold\n"
    )
    request, _ = await one_request(
        harness, temperature=0.7, seed=42, top_p=0.9, max_tokens_param="max_tokens", personas_file=personas
    )
    assert (request["temperature"], request["seed"], request["top_p"]) == (0.1, 7, 0.9)
    assert request["max_tokens"] == 50 and "max_completion_tokens" not in request
    assert request["logit_bias"] == {"99": 5}


async def test_the_end_user_is_sent_as_a_keyed_hash_never_the_raw_id(harness: Harness) -> None:
    request, _ = await one_request(harness, user_id_salt="pepper")
    expected = hmac.new(b"pepper", f"{TEAM_ID}:U1".encode(), hashlib.sha256).hexdigest()
    assert request["safety_identifier"] == expected
    assert "U1" not in str({k: v for k, v in request.items() if k != "messages"})
    assert "user" not in request


async def test_the_user_parameter_and_turning_it_off(harness: Harness) -> None:
    async with harness.running(user_id_param="user"):
        await harness.say("one")
        await harness.replies_done(1)
    async with harness.running(send_user_id=False):
        await harness.say("two")
        await harness.replies_done(2)
    as_user, off = harness.model.requests
    assert len(as_user["user"]) == 64 and "safety_identifier" not in as_user
    assert "user" not in off and "safety_identifier" not in off


async def test_organisation_and_project_are_sent_as_headers(harness: Harness) -> None:
    await one_request(harness, openai_org_id="org-123", openai_project_id="proj_456")
    headers = harness.model.request_headers[0]
    assert headers["openai-organization"] == "org-123" and headers["openai-project"] == "proj_456"


async def test_azure_openai_uses_the_deployment_path_and_api_key(harness: Harness) -> None:
    endpoint = harness.model.base_url.removesuffix("/v1")
    request, _ = await one_request(
        harness,
        azure_openai_endpoint=endpoint,
        azure_openai_api_key="azure-key",
        openai_api_version="2024-10-21",
        openai_model="my-deployment",
        openai_base_url=None,
        openai_api_key=None,
    )
    assert harness.model.request_paths[0] == (
        "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
    )
    assert harness.model.request_headers[0]["api-key"] == "azure-key"
    assert request["messages"][-1]["content"] == "alice: hi"
    assert (
        harness.slack.thread("C1", harness.slack.calls_to("chat.startStream")[0].args["thread_ts"])[-1][
            "user"
        ]
        == BOT_USER_ID
    )


async def test_a_stalled_stream_times_out_but_a_long_healthy_one_does_not(harness: Harness) -> None:
    words = [f"w{i} " for i in range(15)]
    harness.model.script(
        Reply(chunks=["start ", "then nothing"], chunk_delay=1.5),  # stalls between chunks
        Reply(chunks=words, chunk_delay=0.2),  # 3 s in all, never 0.5 s between chunks
    )
    async with harness.running(openai_timeout_seconds=0.5):
        stalled = await harness.say("stall")
        await harness.replies_done(1)
        healthy = await harness.say("stream long")
        await harness.replies_done(2, timeout=15)
    texts = {ts: [m["text"] for m in harness.slack.thread("C1", ts)][-1] for ts in (stalled, healthy)}
    assert texts[stalled].startswith("start ") and texts[stalled].endswith(ModelError("timeout").user_message)
    assert texts[healthy] == "".join(words)
