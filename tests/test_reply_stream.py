"""The reply stream's log of the messages it writes (``SlackReplyStream`` with the real Slack client
against the fake Slack): written beside the answer, in order, its failure reported at the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from slack_sdk.web.async_client import AsyncWebClient

from bot.domain import Incoming, ReplyLog, ThreadKey
from bot.errors import HistoryError
from bot.slack import SPLIT_AT, ChannelRefusals, SlackReplyStream
from tests.fake_slack import TEAM_ID, FakeSlack

pytestmark = pytest.mark.asyncio

QUESTION_TS = "1700000000.000001"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = FakeSlack()
    await server.start()
    server.add_message("C1", ts=QUESTION_TS, user="U1", text="a question")
    try:
        yield server
    finally:
        await server.close()


def stream(fake: FakeSlack, log: ReplyLog) -> SlackReplyStream:
    incoming = Incoming(ThreadKey(TEAM_ID, "C1", QUESTION_TS), QUESTION_TS, "U1", "a question", True, False)
    client = AsyncWebClient(token="xoxb-test", base_url=fake.api_url)
    return SlackReplyStream(client, incoming, "native", ChannelRefusals(), log, flush_interval=0)


async def test_the_answer_goes_on_while_its_message_is_recorded_and_a_failed_record_fails_the_end(
    fake: FakeSlack,
) -> None:
    gate = asyncio.Event()

    async def record(part: int, ts: str) -> None:
        await gate.wait()
        raise HistoryError("Redis is unreachable")

    reply = stream(fake, ReplyLog("J1", 1, (), record))

    async def write() -> None:
        await reply.append("Hello, ")
        await reply.append("world.")
        await reply.finish()

    writing = asyncio.create_task(write())
    # The whole answer reaches Slack while the record of its message still waits ...
    await fake.wait_for(lambda: bool(fake.calls_to("chat.stopStream")), 5, "the answer's last write")
    assert [m["text"] for m in fake.thread("C1", QUESTION_TS)][1:] == ["Hello, world."]
    assert not writing.done()
    # ... and the reply's end reports that the record failed: the attempt fails, to be tried again.
    gate.set()
    with pytest.raises(HistoryError):
        await writing


async def test_messages_are_recorded_in_the_order_they_were_written(fake: FakeSlack) -> None:
    recorded: list[tuple[int, str]] = []

    async def record(part: int, ts: str) -> None:
        if part == 0:
            await asyncio.sleep(0.2)  # the first record is slow; the second must not overtake it
        recorded.append((part, ts))

    reply = stream(fake, ReplyLog("J1", 1, (), record))
    await reply.append("word " * (SPLIT_AT // 5 + 10))  # longer than one message: split in two
    await reply.finish()
    written = [m["ts"] for m in fake.thread("C1", QUESTION_TS)][1:]
    assert len(written) == 2
    assert recorded == [(0, written[0]), (1, written[1])]
