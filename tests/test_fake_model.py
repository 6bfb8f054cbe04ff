"""The fake OpenAI server, driven by the real openai.AsyncOpenAI client over loopback HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from tests.fake_model import FakeModel, Reply

pytestmark = pytest.mark.asyncio

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there, model"}]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeModel]:
    model = FakeModel()
    await model.start()
    try:
        yield model
    finally:
        await model.close()


@pytest_asyncio.fixture
async def client(fake: FakeModel) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0) as client:
        yield client


async def test_stream_reassembles_text_and_reports_usage(fake: FakeModel, client: openai.AsyncOpenAI) -> None:
    fake.script(Reply(text="The quick brown fox jumps over the lazy dog.", chunk_size=5, prompt_tokens=42))
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usages: list[CompletionUsage] = []
    async for chunk in stream:
        assert chunk.model == "gpt-4o-mini"
        if chunk.usage is not None:
            assert chunk.choices == []
            usages.append(chunk.usage)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)

    assert "".join(pieces) == "The quick brown fox jumps over the lazy dog."
    assert finish_reasons == ["stop"]
    assert len(usages) == 1
    assert (usages[0].prompt_tokens, usages[0].completion_tokens, usages[0].total_tokens) == (42, 9, 51)


async def test_stream_sends_scripted_chunks_with_delays(fake: FakeModel, client: openai.AsyncOpenAI) -> None:
    fake.script(Reply(chunks=["Hel", "lo"], first_token_delay=0.3, chunk_delay=0.2, finish_reason="length"))
    started = time.monotonic()
    stream = await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert time.monotonic() - started < 0.25, "headers should arrive before the first token"
    arrivals: list[tuple[str, float]] = []
    finish_reason = None
    async for chunk in stream:
        assert chunk.usage is None  # include_usage was not requested
        delta = chunk.choices[0].delta.content
        if delta:
            arrivals.append((delta, time.monotonic() - started))
        finish_reason = chunk.choices[0].finish_reason or finish_reason

    assert [text for text, _ in arrivals] == ["Hel", "lo"]
    assert arrivals[0][1] >= 0.28 and arrivals[1][1] - arrivals[0][1] >= 0.18
    assert finish_reason == "length"


async def test_broken_stream_raises_connection_error(fake: FakeModel, client: openai.AsyncOpenAI) -> None:
    fake.script(Reply(chunks=["one ", "two ", "three"], fail_after_chunks=2))
    stream = await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one two "


async def test_plain_answer_and_recorded_requests(fake: FakeModel, client: openai.AsyncOpenAI) -> None:
    fake.script(Reply(text="Cut short", finish_reason="length"))
    first = await client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=3)
    second = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)

    assert first.choices[0].message.content == "Cut short"
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and first.usage.prompt_tokens == len("hello there, model") // 4
    assert second.choices[0].message.content == "answer 2"  # default reply once the script is used up
    assert second.choices[0].finish_reason == "stop"
    assert [body["model"] for body in fake.requests] == ["gpt-4o", "gpt-4o-mini"]
    assert fake.requests[0]["messages"] == USER and fake.requests[0]["max_tokens"] == 3
    assert "stream" not in fake.requests[1]
    assert fake.request_headers[0]["authorization"] == "Bearer test"


async def test_auth_and_context_errors_raise_typed_exceptions(
    fake: FakeModel, client: openai.AsyncOpenAI
) -> None:
    fake.script(
        Reply(status=401, error_code="invalid_api_key", error_message="Incorrect API key provided"),
        Reply(status=400, error_code="context_length_exceeded", error_message="too long"),
    )
    with pytest.raises(openai.AuthenticationError) as auth:
        await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="gpt-4o", messages=USER)

    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    assert "Incorrect API key provided" in auth.value.message
    assert bad.value.code == "context_length_exceeded"
    assert bad.value.type == "invalid_request_error"
    assert len(fake.requests) == 2


async def test_rate_limit_is_retried_after_retry_after_ms(fake: FakeModel) -> None:
    fake.script(
        Reply(status=429, error_code="rate_limit_exceeded", headers={"retry-after-ms": "10"}),
        Reply(text="after the wait"),
    )
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=1) as client:
        started = time.monotonic()
        answer = await client.chat.completions.create(model="gpt-4o", messages=USER)
        elapsed = time.monotonic() - started

    assert answer.choices[0].message.content == "after the wait"
    assert len(fake.requests) == 2
    assert [h["x-stainless-retry-count"] for h in fake.request_headers] == ["0", "1"]
    assert elapsed < 0.3, "retry-after-ms (10ms) should replace the default backoff of at least 0.375s"


async def test_models_list_and_lookup(fake: FakeModel, client: openai.AsyncOpenAI) -> None:
    fake.models = ["gpt-4o-mini", "o3"]
    listed = [model.id async for model in client.models.list()]
    found = await client.models.retrieve("o3")
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-2")

    assert listed == ["gpt-4o-mini", "o3"]
    assert found.id == "o3" and found.owned_by == "fake"
    assert missing.value.code == "model_not_found"
    assert fake.requests == []  # model lookups are not chat requests


async def test_wait_for_requests_sees_in_flight_request(fake: FakeModel, client: openai.AsyncOpenAI) -> None:
    fake.script(Reply(text="slow", first_token_delay=0.3))
    task = asyncio.create_task(client.chat.completions.create(model="gpt-4o", messages=USER))
    await fake.wait_for_requests(1, timeout=0.2)
    assert not task.done()
    assert (await task).choices[0].message.content == "slow"
    with pytest.raises(AssertionError, match="expected 2 chat request"):
        await fake.wait_for_requests(2, timeout=0.05)
