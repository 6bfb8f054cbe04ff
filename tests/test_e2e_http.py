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
