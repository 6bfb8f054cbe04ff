"""A scripted stand-in for the OpenAI HTTP API, for tests that drive the real ``openai`` client.

FakeModel owns a small aiohttp server on 127.0.0.1 (random free port) that speaks the Chat Completions
wire protocol: ``POST /v1/chat/completions`` (streamed as server-sent events or as one JSON answer),
OpenAI-style error bodies, ``POST /v1/audio/transcriptions`` and ``GET /v1/models[/{id}]``. Tests point
``openai.AsyncOpenAI(base_url=...)`` at it, queue one ``Reply`` per expected HTTP request with
``script()``, and inspect the recorded request bodies and headers afterwards. It owns nothing else:
no client objects are patched or mocked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One scripted answer to one POST /v1/chat/completions request."""

    text: str = "ok"  # the full answer text
    chunks: list[str] | None = None  # if set, stream exactly these deltas (text is then ignored)
    chunk_size: int = 8  # otherwise `text` is split into deltas of this many characters
    first_token_delay: float = 0.0  # seconds before the first content chunk (headers are sent first)
    chunk_delay: float = 0.0  # seconds between content chunks
    finish_reason: str = "stop"  # e.g. "length" for an answer cut at the token limit
    usage: bool = True  # send the final usage chunk when the request asked stream_options.include_usage
    prompt_tokens: int = 0  # 0: report (total characters of message contents) // 4
    completion_tokens: int = 0  # 0: report the number of content chunks
    status: int = 200  # non-200: answer with an OpenAI-style error body and this HTTP status
    error_code: str | None = None  # error.code, e.g. "context_length_exceeded", "rate_limit_exceeded"
    error_message: str = "scripted error"
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers, e.g. retry-after-ms
    fail_after_chunks: int | None = None  # streams: drop the connection after this many content chunks

    def deltas(self) -> list[str]:
        """The content deltas this reply streams (or joins, when not streaming)."""
        if self.chunks is not None:
            return list(self.chunks)
        size = max(1, self.chunk_size)
        return [self.text[i : i + size] for i in range(0, len(self.text), size)]


def error_body(status: int, message: str, code: str | None) -> dict[str, Any]:
    """An OpenAI-style error body; ``type`` follows what the real API sends for that status."""
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def rough_prompt_tokens(body: dict[str, Any]) -> int:
    """About four characters per token over all message contents (plain strings or text parts)."""
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return chars // 4


class FakeModel:
    """An OpenAI-compatible chat server answering from a FIFO queue of scripted replies."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        self.request_paths: list[str] = []  # path and query of each chat request
        self.list_requests = 0  # GET /v1/models calls
        self.models: list[str] = ["gpt-4o-mini", "gpt-4o"]
        self.model_lookup = True  # False: no GET /v1/models/{id} route at all (as vLLM)
        self._queue: deque[Reply] = deque()
        self.default_reply: Reply | None = None  # answers when the queue is empty (benchmarks)
        self.transcript = "a transcript"  # what POST /v1/audio/transcriptions answers
        self.transcriptions: list[dict[str, Any]] = []  # their form fields (the file as its size)
        self.first_content_at: dict[int, float] = {}  # request number -> monotonic time of its first delta
        # request number -> (monotonic) when it arrived and when its stream's last event was sent: the
        # model's own time, which the bench takes out of a reply's overhead.
        self.arrived_at: dict[int, float] = {}
        self.done_at: dict[int, float] = {}
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)  # Azure
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model_id}", self._get_model)
        # A short shutdown timeout so close() does not wait long for streams a test left hanging.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        assert self._port is not None, "FakeModel.start() has not been awaited"
        return f"http://127.0.0.1:{self._port}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies; each chat request consumes one (retries by the client included)."""
        self._queue.extend(replies)

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (the API)
        """Wait until at least ``n`` chat requests have arrived, else fail naming what was seen."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.requests) < n:
            if asyncio.get_running_loop().time() >= deadline:
                seen = [(body.get("messages") or [{}])[-1].get("content") for body in self.requests]
                raise AssertionError(
                    f"expected {n} chat request(s) within {timeout}s, got {len(self.requests)}; "
                    f"last message contents: {seen!r}"
                )
            await asyncio.sleep(0.005)

    # --- handlers -------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body: dict[str, Any] = await request.json()
        self.requests.append(body)
        self.request_headers.append({name.lower(): value for name, value in request.headers.items()})
        self.request_paths.append(request.path_qs)
        number = len(self.requests)
        self.arrived_at[number] = arrived
        reply = self._queue.popleft() if self._queue else self.default_reply or Reply(text=f"answer {number}")
        headers = {"x-request-id": f"req_fake_{number}", **reply.headers}

        if reply.status != 200:
            await asyncio.sleep(reply.first_token_delay)
            error = error_body(reply.status, reply.error_message, reply.error_code)
            return web.json_response(error, status=reply.status, headers=headers)

        deltas = reply.deltas()
        prompt_tokens = reply.prompt_tokens or rough_prompt_tokens(body)
        base = {"id": f"chatcmpl-fake-{number}", "created": int(time.time()), "model": body.get("model", "")}
        if not body.get("stream"):
            # Take as long as the equivalent stream would, then answer at once.
            await asyncio.sleep(reply.first_token_delay + reply.chunk_delay * max(0, len(deltas) - 1))
            completion_tokens = reply.completion_tokens or len(deltas)
            message = {"role": "assistant", "content": "".join(deltas), "refusal": None}
            answer = {
                **base,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
                "usage": usage(prompt_tokens, completion_tokens),
            }
            return web.json_response(answer, headers=headers)
        return await self._stream(request, body, reply, deltas, base, prompt_tokens, headers, number)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        reply: Reply,
        deltas: list[str],
        base: dict[str, Any],
        prompt_tokens: int,
        headers: dict[str, str],
        number: int,
    ) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache", **headers}
        )
        await response.prepare(request)  # StreamResponse sends the status line and headers right away

        async def send(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data)
            await response.write(f"data: {payload}\n\n".encode())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            extra = {"usage": None} if include_usage else {}  # the real API sends null until the last chunk
            return {**base, "object": "chat.completion.chunk", "choices": [choice], **extra}

        broken = reply.fail_after_chunks is not None
        try:
            await asyncio.sleep(reply.first_token_delay)
            await send(chunk({"role": "assistant", "content": ""}))
            for index, delta in enumerate(deltas[: reply.fail_after_chunks] if broken else deltas):
                if index:
                    await asyncio.sleep(reply.chunk_delay)
                else:
                    self.first_content_at[number] = time.monotonic()
                await send(chunk({"content": delta}))
            if broken:
                # Close the socket mid-body, a moment after the last chunk (a connection drops some time
                # after what it delivered was read): the client sees an incomplete chunked response.
                await asyncio.sleep(max(reply.chunk_delay, 0.05))
                if request.transport is not None:
                    request.transport.close()
                return response
            await send(chunk({}, reply.finish_reason))
            if include_usage and reply.usage:
                tokens = usage(prompt_tokens, reply.completion_tokens or len(deltas))
                await send({**base, "object": "chat.completion.chunk", "choices": [], "usage": tokens})
            self.done_at[number] = time.monotonic()
            await send("[DONE]")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away mid-stream; nothing left to do
        return response

    async def _transcribe(self, request: web.Request) -> web.Response:
        """``POST /v1/audio/transcriptions`` (multipart): the scripted transcript."""
        form = await request.post()
        upload = form.get("file")
        fields: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
        assert isinstance(upload, web.FileField), "a transcription request carries its file"
        fields["file_bytes"] = len(upload.file.read())
        fields["file_name"] = upload.filename
        self.transcriptions.append(fields)
        return web.json_response({"text": self.transcript})

    async def _list_models(self, request: web.Request) -> web.Response:
        self.list_requests += 1
        return web.json_response({"object": "list", "data": [model_entry(m) for m in self.models]})

    async def _get_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if not self.model_lookup:
            return web.Response(status=404, text="Not Found")
        if model_id in self.models:
            return web.json_response(model_entry(model_id))
        message = f"The model '{model_id}' does not exist"
        return web.json_response(error_body(404, message, "model_not_found"), status=404)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "fake"}
