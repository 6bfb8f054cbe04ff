"""Checks that FakeSlack speaks the wire protocol the real slack_sdk / slack_bolt clients expect."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from tests.fake_slack import BOT_ID, BOT_USER_ID, TEAM_ID, FakeSlack

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = FakeSlack()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def client_for(fake: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-test", base_url=fake.api_url)


async def test_post_update_and_stream_show_final_text_in_thread(fake: FakeSlack) -> None:
    fake.add_message("C1", ts="1700000000.000001", user="U1", text="question?")
    client = client_for(fake)

    posted = await client.chat_postMessage(channel="C1", thread_ts="1700000000.000001", text="thinking")
    await client.chat_update(channel="C1", ts=posted["ts"], text="answer one")
    stream = await client.chat_stream(
        channel="C1",
        thread_ts="1700000000.000001",
        recipient_team_id=TEAM_ID,
        recipient_user_id="U1",
        buffer_size=4,
    )
    await stream.append(markdown_text="**hello ")
    await stream.append(markdown_text="world**")
    await stream.stop(markdown_text="!")

    thread = fake.thread("C1", "1700000000.000001")
    assert [m["text"] for m in thread] == ["question?", "answer one", "**hello world**!"]
    assert thread[1]["user"] == BOT_USER_ID and thread[1]["bot_id"] == BOT_ID
    assert thread[1]["ts"] < thread[2]["ts"]
    assert fake.calls_to("chat.postMessage")[0].token == "xoxb-test"
    assert [c.method for c in fake.calls] == [
        "chat.postMessage",
        "chat.update",
        "chat.startStream",
        "chat.appendStream",
        "chat.stopStream",
    ]
    with pytest.raises(SlackApiError) as err:
        await client.chat_appendStream(channel="C1", ts=stream.ts or "", markdown_text="late")
    assert err.value.response["error"] == "message_not_in_streaming_state"


async def test_conversations_replies_paginates_with_cursor(fake: FakeSlack) -> None:
    parent = "1700000000.000010"
    fake.add_message("C1", ts=parent, user="U1", text="m0")
    for i in range(1, 5):
        fake.add_message("C1", ts=f"1700000000.00001{i}", user="U2", text=f"m{i}", thread_ts=parent)
    client = client_for(fake)

    texts: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await client.conversations_replies(channel="C1", ts=parent, limit=2, cursor=cursor)
        pages += 1
        texts += [m["text"] for m in page["messages"]]
        cursor = page["response_metadata"]["next_cursor"]
        assert page["has_more"] == bool(cursor)
        if not cursor:
            break

    assert texts == ["m0", "m1", "m2", "m3", "m4"]
    assert pages == 3
    assert fake.calls_to("conversations.replies")[1].args["limit"] == "2"
    with pytest.raises(SlackApiError) as err:
        await client.conversations_replies(channel="C1", ts="1.000000")
    assert err.value.response["error"] == "thread_not_found"


async def test_users_info_returns_seeded_users(fake: FakeSlack) -> None:
    client = client_for(fake)
    alice = await client.users_info(user="U1")
    assert alice["user"]["profile"]["display_name"] == "alice"
    bot = await client.users_info(user=BOT_USER_ID)
    assert bot["user"]["is_bot"] is True
    with pytest.raises(SlackApiError) as err:
        await client.users_info(user="U404")
    assert err.value.response["error"] == "user_not_found"


async def test_fail_makes_real_client_raise(fake: FakeSlack) -> None:
    fake.fail["chat.postMessage"] = "ratelimited_but_not_really"
    client = client_for(fake)
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C1", text="hi")
    assert err.value.response["error"] == "ratelimited_but_not_really"
    assert fake.thread("C1", "1") == []
    with pytest.raises(SlackApiError) as unknown:
        await client.api_call("no.such.method")
    assert unknown.value.response["error"] == "unknown_method"


async def test_socket_mode_round_trip_with_bolt(fake: FakeSlack) -> None:
    app = AsyncApp(client=client_for(fake), signing_secret="x")
    seen: list[dict[str, Any]] = []

    @app.event("app_mention")
    async def on_mention(event: dict[str, Any], say: Any) -> None:
        seen.append(event)
        await say(text=f"hi <@{event['user']}>", thread_ts=event["ts"])

    handler = AsyncSocketModeHandler(app, "xapp-test")
    await handler.connect_async()  # type: ignore[no-untyped-call]
    try:
        event = {
            "type": "app_mention",
            "user": "U1",
            "text": f"<@{BOT_USER_ID}> hello",
            "ts": "1700000000.000001",
            "channel": "C1",
            "event_ts": "1700000000.000001",
        }
        envelope_id = await fake.send_event(event)
        assert await fake.wait_ack(envelope_id) < 5
        await fake.wait_for(lambda: bool(fake.calls_to("chat.postMessage")), what="say() to post")
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]

    assert seen and seen[0]["text"] == f"<@{BOT_USER_ID}> hello"
    assert fake.calls_to("apps.connections.open")[0].token == "xapp-test"
    assert fake.calls_to("auth.test"), "bolt authorizes the event via auth.test"
    post = fake.calls_to("chat.postMessage")[0]
    assert post.args["channel"] == "C1" and post.args["thread_ts"] == "1700000000.000001"
    assert fake.thread("C1", "1700000000.000001")[0]["text"] == "hi <@U1>"
