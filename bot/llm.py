"""The model boundary: ``OpenAIChat`` streams a chat completion from any OpenAI-compatible endpoint.

It builds the request from the persona (sending only the parameters that are set, since reasoning
models reject some of them), yields the text as it arrives and then one ``StreamEnd`` with the finish
reason and the API's own usage, and turns every ``openai`` exception into a ``ModelError`` whose kind
says what users are told. Timeouts apply to the wait for each chunk; retries (429, 5xx, connection
errors, honouring ``retry-after``) are the openai client's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from bot.domain import ChatMessage, Persona, StreamEnd, Usage
from bot.errors import ModelError, ModelErrorKind


def make_client(
    *,
    api_key: str | None,
    base_url: str | None,
    organization: str | None,
    project: str | None,
    timeout_seconds: float,
    max_retries: int,
) -> AsyncOpenAI:
    """An ``AsyncOpenAI`` client; the read timeout bounds the first token and each following chunk."""
    return AsyncOpenAI(
        # Local OpenAI-compatible servers need no key, but the client insists on one.
        api_key=api_key or "not-needed",
        base_url=base_url,
        organization=organization,
        project=project,
        timeout=openai.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0)),
        max_retries=max_retries,
    )


def error_kind(exc: openai.OpenAIError) -> ModelErrorKind:
    """Which kind of problem an ``openai`` exception is, in the terms users are told."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "unavailable"
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return "auth"
    if isinstance(exc, openai.RateLimitError):
        return "rate_limit"
    if isinstance(exc, openai.NotFoundError):
        return "model_not_found"
    if isinstance(exc, openai.BadRequestError):
        return "context_length" if exc.code == "context_length_exceeded" else "bad_request"
    if isinstance(exc, openai.InternalServerError):
        return "unavailable"
    if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
        return "unavailable"
    return "unknown"


class OpenAIChat:
    """Implements ``domain.ChatModel`` with the Chat Completions streaming API."""

    def __init__(
        self, client: AsyncOpenAI, *, default_model: str, max_reply_tokens: int | None = None
    ) -> None:
        self._client = client
        self._default_model = default_model
        self._max_reply_tokens = max_reply_tokens

    def request(self, messages: Sequence[ChatMessage], persona: Persona) -> dict[str, Any]:
        """The request body's parameters: only those the persona or the settings set."""
        params: dict[str, Any] = {
            "model": persona.model or self._default_model,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        optional = {
            "temperature": persona.temperature,
            "top_p": persona.top_p,
            "max_completion_tokens": persona.max_tokens or self._max_reply_tokens,
            "presence_penalty": persona.presence_penalty,
            "frequency_penalty": persona.frequency_penalty,
            "stop": list(persona.stop) if persona.stop else None,
        }
        params.update({name: value for name, value in optional.items() if value is not None})
        return params

    async def stream(
        self, messages: Sequence[ChatMessage], persona: Persona
    ) -> AsyncIterator[str | StreamEnd]:
        finish_reason: str | None = None
        usage: Usage | None = None
        try:
            # The typed create() re-walks the whole message list on every call (several ms for a long
            # thread); the client's own post() sends the body we built, with the same retries and errors.
            chunks = await self._client.post(
                "/chat/completions",
                body=self.request(messages, persona),
                cast_to=ChatCompletionChunk,
                stream=True,
                stream_cls=openai.AsyncStream[ChatCompletionChunk],
            )
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
        except openai.OpenAIError as exc:
            raise ModelError(error_kind(exc), f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            # A stream cut or stalled mid-way surfaces from the HTTP library underneath, unwrapped.
            kind: ModelErrorKind = "timeout" if "Timeout" in type(exc).__name__ else "unavailable"
            raise ModelError(kind, f"{type(exc).__name__}: {exc}") from exc
        yield StreamEnd(finish_reason=finish_reason, usage=usage)
