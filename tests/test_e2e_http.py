"""End to end in HTTP mode: the Events API at /slack/events, with Slack's request signatures verified."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

from bot.processes import run
from bot.services import open_services
from bot.settings import Settings
from tests.conftest import Harness
from tests.fake_slack import BOT_USER_ID
from tests.procs import PrivateRedis, free_port, until_ready

SECRET = "signing-secret"


@contextlib.asynccontextmanager
async def serving_http(settings: Settings, port: int) -> AsyncIterator[None]:
    """The bot in HTTP mode on ``port`` (with a worker in the same process), until the block ends."""
    stop = asyncio.Event()
    async with open_services(settings) as services:
        serving = asyncio.create_task(
            run(services, http=True, host="127.0.0.1", port=port, workers=None, metrics_port=None, stop=stop)
        )
        try:
            yield
        finally:
            stop.set()
            await serving


def signed(body: str, secret: str = SECRET) -> dict[str, str]:
    timestamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": "application/json",
    }


async def test_http_mode_answers_signed_events_and_rejects_bad_signatures(harness: Harness) -> None:
    port = free_port()
    ts = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=ts, user="U1", text=f"<@{BOT_USER_ID}> over http?")
    event = {
        "type": "app_mention",
        "user": "U1",
        "text": f"<@{BOT_USER_ID}> over http?",
        "ts": ts,
        "channel": "C1",
    }
    body = json.dumps(harness.slack.event_callback(event, event_id="EvHTTP1"))
    url = f"http://127.0.0.1:{port}/slack/events"
    async with serving_http(harness.settings(slack_app_token=None), port):
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # until the server listens
                try:
                    forged = await http.post(url, data=body, headers=signed(body, "wrong-secret"))
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
            stale = signed(body) | {"X-Slack-Request-Timestamp": str(int(time.time()) - 3600)}
            replayed = await http.post(url, data=body, headers=stale)
            genuine = await http.post(url, data=body, headers=signed(body))
        await harness.replies_done(1)
    assert forged.status == 401 and replayed.status == 401
    assert genuine.status == 200
    assert len(harness.model.requests) == 1
    assert harness.slack.thread("C1", ts)[-1]["text"] == "answer 1"


async def test_two_replicas_sharing_redis_answer_a_redelivered_event_once(harness: Harness) -> None:
    ports = [free_port(), free_port()]
    ts = harness.slack.next_ts()
    text = f"<@{BOT_USER_ID}> which replica answers?"
    harness.slack.add_message("C1", ts=ts, user="U1", text=text)
    body = json.dumps(
        harness.slack.event_callback(
            {"type": "app_mention", "user": "U1", "text": text, "ts": ts, "channel": "C1"}, event_id="EvTWICE"
        )
    )
    settings = harness.settings(slack_app_token=None)
    async with serving_http(settings, ports[0]), serving_http(settings, ports[1]):
        async with aiohttp.ClientSession() as http:

            async def deliver(port: int) -> int:
                for _ in range(100):
                    try:
                        url = f"http://127.0.0.1:{port}/slack/events"
                        async with http.post(url, data=body, headers=signed(body)) as response:
                            return response.status
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.02)
                raise AssertionError(f"nothing listens on {port}")

            statuses = await asyncio.gather(*(deliver(port) for port in ports))
        await harness.replies_done(1)
        await harness.settled()
    assert statuses == [200, 200]
    assert len(harness.model.requests) == 1
    assert len(harness.slack.calls_to("chat.startStream")) == 1


async def test_http_mode_refuses_events_redis_cannot_take_and_serves_the_probes(
    harness: Harness, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    port = free_port()
    ts = harness.slack.next_ts()
    text = f"<@{BOT_USER_ID}> during an outage?"
    harness.slack.add_message("C1", ts=ts, user="U1", text=text)
    event = {"type": "app_mention", "user": "U1", "text": text, "ts": ts, "channel": "C1"}
    body = json.dumps(harness.slack.event_callback(event, event_id="EvOUTAGE"))
    url = f"http://127.0.0.1:{port}"
    try:
        async with (
            serving_http(harness.settings(slack_app_token=None, redis_url=server.url), port),
            aiohttp.ClientSession() as http,
        ):
            for _ in range(100):  # until the server listens
                try:
                    alive = await http.get(f"{url}/healthz")
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
            ready = await until_ready(port)
            server.stop()
            refused = await http.post(f"{url}/slack/events", data=body, headers=signed(body))
            server.start()
            retried = await http.post(f"{url}/slack/events", data=body, headers=signed(body))
            await harness.replies_done(1)
            metrics = await http.get(f"{url}/metrics")
            assert "sgb_events_refused_total" in await metrics.text()
    finally:
        server.stop()
    assert alive.status == 200
    assert ready["checks"] == {"redis": True, "worker": True}
    assert refused.status == 500  # Slack delivers it again
    assert retried.status == 200
    assert harness.answers() == ["answer 1"]


async def test_http_mode_takes_a_message_shortcut_as_a_signed_form_and_answers_it(harness: Harness) -> None:
    port = free_port()
    ts = harness.slack.next_ts()
    harness.slack.add_message("C1", ts=ts, user="U2", text="Bonjour à tous")
    payload = {
        "type": "message_action",
        "callback_id": "translate_message",
        "team": {"id": "T0001", "domain": "fake"},
        "user": {"id": "U1", "team_id": "T0001"},
        "channel": {"id": "C1"},
        "message_ts": ts,
        "message": {"type": "message", "ts": ts, "user": "U2", "text": "Bonjour à tous"},
        "response_url": harness.slack.response_url_for("U1"),
        "trigger_id": "trigger-http",
    }
    body = urlencode({"payload": json.dumps(payload)})
    headers = signed(body) | {"Content-Type": "application/x-www-form-urlencoded"}
    url = f"http://127.0.0.1:{port}/slack/events"
    async with serving_http(harness.settings(slack_app_token=None), port):
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # until the server listens
                try:
                    acked = await http.post(url, data=body, headers=headers)
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
        await harness.slack.wait_for(lambda: bool(harness.slack.responses("U1")), what="the translation")
    assert acked.status == 200
    assert harness.slack.responses("U1") == ["answer 1"]
    assert "into English" in harness.model.requests[0]["messages"][0]["content"]
