"""The model boundary: ``OpenAIChat`` streams a chat completion from any OpenAI-compatible endpoint.

It builds the request from the persona (sending only the parameters that are set, since reasoning
models reject some of them), yields the text as it arrives and then one ``StreamEnd`` with the finish
reason and the API's own usage, and turns every ``openai`` exception into a ``ModelError`` whose kind
says what users are told. Timeouts apply to the wait for each chunk; retries (429, 5xx, connection
errors, honouring ``retry-after``) are the openai client's own. The client runs on aiohttp, and the
stream's events are read here from the raw response (orjson, no typed chunk per event): both for CPU.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
from openai import AsyncAzureOpenAI, AsyncOpenAI

from bot.domain import ChatMessage, Persona, StreamEnd, Usage, valid_text
from bot.errors import ModelError, ModelErrorKind
from bot.observability import FIRST_TOKEN, MODEL_ERRORS
from bot.params import PARAMS, request_value


def make_client(
    *,
    api_key: str | None,
    base_url: str | None,
    organization: str | None,
    project: str | None,
    timeout_seconds: float,
    max_retries: int,
    azure_endpoint: str | None = None,
    api_version: str | None = None,
) -> AsyncOpenAI:
    """The client for the configured endpoint (Azure OpenAI when ``azure_endpoint`` is set).

    The read timeout bounds the wait for the first token and for each following chunk, so a long answer
    that keeps streaming is never cut off; retries are the client's own and honour ``retry-after``.
    """
    timeout = openai.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0))
    # On aiohttp, like the Slack client: one HTTP stack, and a lighter one per request than httpx's
    # (bench/RESULTS.md, issue 13: about 1 ms of CPU less per reply).
    http_client = openai.DefaultAioHttpClient(timeout=timeout)
    if azure_endpoint:
        # The model is then a deployment name, which the client puts in the URL.
        return AsyncAzureOpenAI(
            azure_endpoint=azure_endpoint,
            api_key=api_key,
            api_version=api_version,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
        )
    return AsyncOpenAI(
        # Local OpenAI-compatible servers need no key, but the client insists on one.
        api_key=api_key or "not-needed",
        base_url=base_url,
        organization=organization,
        project=project,
        timeout=timeout,
        max_retries=max_retries,
        http_client=http_client,
    )


async def list_models(client: AsyncOpenAI) -> list[str]:
    """The model ids the endpoint offers (``GET /models``)."""
    try:
        return sorted([model.id async for model in client.models.list()])
    except openai.OpenAIError as exc:
        raise ModelError(error_kind(exc), f"{type(exc).__name__}: {exc}") from exc


async def model_exists(client: AsyncOpenAI, model: str) -> bool:
    """True when ``GET /models/{model}`` finds it."""
    try:
        await client.models.retrieve(model)
    except openai.NotFoundError:
        return False
    except openai.OpenAIError as exc:
        raise ModelError(error_kind(exc), f"{type(exc).__name__}: {exc}") from exc
    return True


def error_kind(exc: openai.OpenAIError) -> ModelErrorKind:
    """Which kind of problem an ``openai`` exception is, in the terms users are told."""
    if isinstance(exc, openai.APITimeoutError):
        # The aiohttp transport reports a refused connection as a connect timeout; its cause tells.
        return "unavailable" if _refused(exc) else "timeout"
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


def _refused(exc: BaseException) -> bool:
    """True when a connection error underneath ``exc`` is a refusal (or an unknown host), not a wait."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectorError) and not isinstance(cause.os_error, TimeoutError):
            return True
        cause = cause.__cause__
    return False


def _counted(exc: Exception) -> ModelError:
    """The ``ModelError`` a failed stream is, counted by kind for ``/metrics``."""
    if isinstance(exc, openai.OpenAIError):
        kind = error_kind(exc)
    else:
        # A stream cut or stalled mid-way surfaces from the HTTP library underneath, unwrapped.
        kind = "timeout" if "Timeout" in type(exc).__name__ else "unavailable"
    MODEL_ERRORS.labels(kind).inc()
    return ModelError(kind, f"{type(exc).__name__}: {exc}")


async def transcribe(client: AsyncOpenAI, model: str, name: str, data: bytes) -> str:
    """The text of a voice clip (``POST /audio/transcriptions``)."""
    try:
        result = await client.audio.transcriptions.create(model=model, file=(name, data))
    except openai.OpenAIError as exc:
        raise ModelError(error_kind(exc), f"{type(exc).__name__}: {exc}") from exc
    return valid_text(result.text)


# Models that see images, by name (``VISION=auto``): OpenAI's, and the usual open multimodal families. A
# wrong guess costs one refused request: the model is then answered from the text (and remembered).
_SEES_IMAGES = re.compile(
    r"^(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-4-turbo|gpt-4-vision|gpt-5|o1(?!-mini|-preview)|o3(?!-mini)"
    r"|o4-mini|computer-use)"
    r"|vision|[-_.]vl\b|llava|pixtral|gemini|claude|gemma-?3|minicpm-v|llama-?4|moondream|bakllava",
    re.IGNORECASE,
)
_NO_IMAGES = re.compile(r"audio|realtime|transcribe|tts|search", re.IGNORECASE)


def sees_images_by_name(model: str) -> bool:
    return bool(_SEES_IMAGES.search(model)) and not _NO_IMAGES.search(model)


def _has_images(messages: Sequence[ChatMessage]) -> bool:
    return any(
        isinstance(m["content"], list) and any(part["type"] == "image_url" for part in m["content"])
        for m in messages
    )


def hashed_user(key: bytes, end_user: str) -> str:
    """A stable pseudonym for "team:user": the provider can tell users apart without knowing them."""
    return hmac.new(key, end_user.encode(), hashlib.sha256).hexdigest()


class OpenAIChat:
    """Implements ``domain.ChatModel`` with the Chat Completions streaming API."""

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        defaults: Persona,
        max_tokens_param: str = "max_completion_tokens",
        user_id_param: str | None = None,
        user_id_key: bytes = b"",
    ) -> None:
        self._client = client
        # The endpoint's whole URL and a body already in JSON: given a path and a dict, the client would
        # merge the path with its base URL and serialize the body on every call (a third of the CPU of
        # building a request). Azure's client finds the deployment in the body's model and rewrites the
        # path with it, so it gets both as the API gives them.
        self._azure = isinstance(client, AsyncAzureOpenAI)
        self._url = "/chat/completions" if self._azure else str(client.base_url.join("chat/completions"))
        self._defaults = defaults
        self._max_tokens_param = max_tokens_param
        self._user_id_param = user_id_param
        self._user_id_key = user_id_key
        self._refused_images: set[str] = set()  # models the endpoint answered "no images" for

    def model_for(self, persona: Persona) -> str:
        """The model a request for ``persona`` asks for."""
        return persona.model or self._defaults.model or ""

    def reply_cap(self, persona: Persona) -> int | None:
        return persona.max_tokens or self._defaults.max_tokens

    def sees_images(self, persona: Persona) -> bool:
        """``vision`` of the persona, else of the settings: on, off, or auto (by the model's name, unless
        the endpoint refused images for it before)."""
        vision = persona.vision or self._defaults.vision or "auto"
        if vision != "auto":
            return vision == "on"
        model = self.model_for(persona)
        return model not in self._refused_images and sees_images_by_name(model)

    def request(
        self, messages: Sequence[ChatMessage], persona: Persona, end_user: str = ""
    ) -> dict[str, Any]:
        """The request body: the persona's parameters over the settings', only those set."""
        params: dict[str, Any] = {
            "model": self.model_for(persona),
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for param in PARAMS:
            value = getattr(persona, param.name)
            value = getattr(self._defaults, param.name) if value is None else value
            if value is not None and param.sent and param.name != "model":
                # The reply's size limit goes under the name the endpoint knows (MAX_TOKENS_PARAM).
                key = self._max_tokens_param if param.name == "max_tokens" else param.name
                params[key] = request_value(value)
        if self._user_id_param and end_user:
            params[self._user_id_param] = hashed_user(self._user_id_key, end_user)
        return params

    async def stream(
        self, messages: Sequence[ChatMessage], persona: Persona, end_user: str = ""
    ) -> AsyncIterator[str | StreamEnd]:
        end = _StreamState()
        started, first_token = time.monotonic(), True
        try:
            # The client's own post() sends the body we built (the typed create() re-walks the whole
            # message list on every call), with its retries, auth and errors; it returns the raw HTTP
            # response, whose events are read here: building a typed chunk per event costs more CPU
            # than everything else a streamed reply does.
            body = self.request(messages, persona, end_user)
            content = None if self._azure else _encoded(body)
            response = await self._client.post(
                self._url,
                body=body if content is None else None,
                content=content,
                cast_to=httpx2.Response,
                stream=True,
            )
            try:
                async for data in _sse_data(response):
                    if data == "[DONE]":
                        break
                    chunk = _json(data)
                    if isinstance(chunk, dict) and chunk.get("error"):
                        # An error event mid-stream, raised as the openai client raises it.
                        raise openai.APIError(_error_message(chunk["error"]), response.request, body=chunk)
                    for text in end.read(chunk):
                        if first_token:
                            FIRST_TOKEN.observe(time.monotonic() - started)
                            first_token = False
                        yield valid_text(text)
            finally:
                await response.aclose()
        except openai.APIStatusError as exc:
            if exc.status_code in (400, 415, 422) and _has_images(messages):
                # Most likely the model or the endpoint takes no images; the caller tries without them.
                self._refused_images.add(self.model_for(persona))
                raise ModelError("images_refused", f"{type(exc).__name__}: {exc}") from exc
            raise _counted(exc) from exc
        except Exception as exc:
            raise _counted(exc) from exc
        yield StreamEnd(
            finish_reason=end.finish_reason, usage=end.usage, model=end.model or self.model_for(persona)
        )


async def _sse_data(response: httpx2.Response) -> AsyncIterator[str]:
    """The data of each server-sent event (its ``data:`` lines joined), as the stream delivers them."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[6:] if line.startswith("data: ") else line[5:])
        # Comments (": ...") and the other fields (event, id, retry) carry nothing for chat completions.
    if lines:
        yield "\n".join(lines)


class _StreamState:
    """What the chunks of one stream said besides the text: model, finish reason, usage. Chunks come
    from any OpenAI-compatible server, so every field is checked for its type before it is used."""

    def __init__(self) -> None:
        self.model = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def read(self, chunk: Any) -> list[str]:
        """The text pieces of one chunk, noting what else it says."""
        if not isinstance(chunk, dict):
            return []
        if not self.model and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if isinstance(usage := chunk.get("usage"), dict):
            details = usage.get("completion_tokens_details")
            reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else 0
            self.usage = Usage(
                _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), _count(reasoning)
            )
        texts = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(content := delta.get("content"), str) and content:
                texts.append(content)
            if isinstance(reason := choice.get("finish_reason"), str) and reason:
                self.finish_reason = reason
        return texts


def _encoded(body: dict[str, Any]) -> bytes | None:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits (a seed, say), which orjson refuses: the client's json takes it.
        return None


def _json(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson refuses escaped lone surrogates, which some servers send mid-character; json takes
        # them (valid_text repairs the text), and raises for what is not JSON at all.
        return json.loads(data)


def _error_message(error: Any) -> str:
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) and message else "An error occurred during streaming"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
