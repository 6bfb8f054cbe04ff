"""End to end in HTTP mode: the Events API at /slack/events, with Slack's request signatures verified."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time

import aiohttp

from bot.app import build, serve_http
from tests.conftest import Harness
from tests.fake_slack import BOT_USER_ID

SECRET = "signing-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    stop = asyncio.Event()
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
    async with build(harness.settings(slack_app_token=None)) as bot:
        serving = asyncio.create_task(serve_http(bot, stop, host="127.0.0.1", port=port))
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
        stop.set()
        await serving
    assert forged.status == 401 and replayed.status == 401
    assert genuine.status == 200
    assert len(harness.model.requests) == 1
    assert harness.slack.thread("C1", ts)[-1]["text"] == "answer 1"


async def test_two_replicas_sharing_redis_answer_a_redelivered_event_once(harness: Harness) -> None:
    ports, stop = [free_port(), free_port()], asyncio.Event()
    ts = harness.slack.next_ts()
    text = f"<@{BOT_USER_ID}> which replica answers?"
    harness.slack.add_message("C1", ts=ts, user="U1", text=text)
    body = json.dumps(
        harness.slack.event_callback(
            {"type": "app_mention", "user": "U1", "text": text, "ts": ts, "channel": "C1"}, event_id="EvTWICE"
        )
    )
    settings = harness.settings(slack_app_token=None)
    async with build(settings) as first, build(settings) as second:
        servers = [
            asyncio.create_task(serve_http(bot, stop, host="127.0.0.1", port=port))
            for bot, port in zip((first, second), ports, strict=True)
        ]
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
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*servers)
    assert statuses == [200, 200]
    assert len(harness.model.requests) == 1
    assert len(harness.slack.calls_to("chat.startStream")) == 1
