"""The files people share, read for the model (implements ``domain.FileReader``).

For each file of a message: what kind it is (from Slack's metadata), whether the bot may read it (size,
kind, transcription set up), the download from Slack (``SlackAdapter.download``, the bot token, Slack's
hosts only), the conversion in a child process (``bot.convert``: documents to text, images scaled), and
what the model gets: a header naming the file, then a document's text cut to ``FILE_MAX_TOKENS``, or an
image with its token cost by OpenAI's rules, or a voice clip's transcript. A file that cannot be read
comes back with its problem in words, and the reply names it. File names may be logged at DEBUG; their
URLs and contents never are.

Keys (docs/architecture.md), built here only:

- ``{prefix}{T:C:TS}:picture:{F}``: a scaled image of the thread as a data URL, so that follow-ups show
  it to the model without asking Slack again; kept ``IMAGE_CACHE_SECONDS`` after its last use, then
  fetched and scaled again;
- ``{prefix}file:{T}:{F}``: the threads ("C:TS") whose history holds file F, so that a file deleted in
  Slack leaves each of them; kept as long as a thread's history.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis.asyncio as redis
from openai import AsyncOpenAI

from bot.convert import Converted, classify, convert_in_child, unsupported_reason
from bot.domain import Attachment, Picture, SlackFile, ThreadKey, TokenCounter, Turn
from bot.errors import ModelError, SlackError
from bot.llm import transcribe
from bot.redis_client import redis_errors
from bot.slack import SlackAdapter
from bot.tokens import picture_tokens

log = logging.getLogger(__name__)

CONVERSIONS_AT_ONCE = 2  # child processes converting files, per bot process
FRESH_KEPT = 16  # images kept in memory for the reply that read them, when Redis keeps none
MEMORY_BYTES = 1024**3  # address space a conversion may use
# A document is cut to its first FILE_MAX_TOKENS tokens; only this many characters per token allowed are
# encoded to find the cut, so that a 300-page PDF costs no more to cut than a short one.
CHARS_PER_TOKEN_READ = 10

_DOWNLOAD_PROBLEMS = {
    "too_large": "over the size limit",
    "not_slack": "not stored in Slack",
    "refused": "Slack would not let me download it",
    "HTTP 403": "Slack would not let me download it",
    "HTTP 404": "it is no longer in Slack",
}


@dataclass(frozen=True, slots=True)
class FileLimits:
    """How much of a file the bot takes on (from the settings)."""

    max_bytes: int
    max_tokens: int
    timeout_seconds: float
    picture_cache_seconds: int
    thread_ttl_seconds: int


class SlackFiles:
    """Reads files from Slack for the pipeline; keeps scaled images and which threads hold a file."""

    def __init__(
        self,
        client: redis.Redis,
        slack: SlackAdapter,
        counter: TokenCounter,
        limits: FileLimits,
        *,
        prefix: str,
        model: str,
        openai: AsyncOpenAI,
        transcribe_model: str | None,
    ) -> None:
        self._redis = client
        self._slack = slack
        self._counter = counter
        self._limits = limits
        self._prefix = prefix
        self._model = model  # pictures are counted by this model's rules
        self._openai = openai
        self._transcribe_model = transcribe_model
        self._converting = asyncio.Semaphore(CONVERSIONS_AT_ONCE)
        # With no image cache in Redis, the images just read, for the reply that read them (taken once).
        self._fresh: OrderedDict[tuple[ThreadKey, str], str] = OrderedDict()

    def _picture_key(self, key: ThreadKey, file_id: str) -> str:
        return f"{self._prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:picture:{file_id}"

    def _index_key(self, team: str, file_id: str) -> str:
        return f"{self._prefix}file:{team}:{file_id}"

    async def read(self, key: ThreadKey, files: Sequence[SlackFile]) -> list[Attachment]:
        attachments = list(await asyncio.gather(*(self._read(key, file) for file in files)))
        await self._remember(key, files)
        return attachments

    async def picture_urls(self, key: ThreadKey, pictures: Sequence[Attachment]) -> dict[str, str]:
        """The cached scaled images, and those no longer cached fetched and scaled again."""
        ids = [a.file.id for a in pictures]
        fresh = {i: url for i in ids if (url := self._fresh.pop((key, i), None))}
        ids = [i for i in ids if i not in fresh]
        with redis_errors("reading cached images"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.getex(self._picture_key(key, file_id), ex=max(self._limits.picture_cache_seconds, 1))
                cached = await pipe.execute()
        urls = fresh | {file_id: str(url) for file_id, url in zip(ids, cached, strict=True) if url}
        missing = [a for a in pictures if a.file.id not in urls]
        for attachment, url in zip(
            missing, await asyncio.gather(*(self._refetch(key, a.file) for a in missing)), strict=True
        ):
            if url:
                urls[attachment.file.id] = url
        return urls

    async def _refetch(self, key: ThreadKey, file: SlackFile) -> str | None:
        data = await self._download(file)
        if isinstance(data, str):
            return None  # gone from Slack, or Slack failing: the model is told it is not available
        converted = await self._convert(file, data)
        if converted.kind != "image":
            return None
        url = _data_url(converted)
        await self._cache(key, file.id, url)
        return url

    async def _read(self, key: ThreadKey, file: SlackFile) -> Attachment:
        kind = classify(file.name, file.mimetype, file.filetype)
        problem = self._refusal(file, kind)
        if problem:
            return _unreadable(file, problem)
        data = await self._download(file)
        if isinstance(data, str):
            return _unreadable(file, data)
        log.debug("read a %s file of %d bytes", kind, len(data))
        if kind == "audio":
            return await self._transcript(file, data)
        converted = await self._convert(file, data)
        if converted.kind == "unreadable":
            return _unreadable(file, converted.reason)
        if converted.kind == "image":
            await self._cache(key, file.id, _data_url(converted), just_read=True)
            tokens, billed = picture_tokens(self._model, converted.width, converted.height)
            picture = Picture(converted.mime, converted.width, converted.height, tokens, billed)
            return Attachment(file, f"[image: {file.name}, {converted.detail}]", picture)
        return Attachment(file, await self._document("file", file, converted.text, converted.detail))

    def _refusal(self, file: SlackFile, kind: str) -> str:
        """Why the bot will not even download ``file``, or ""."""
        if file.mode == "external":
            return "a link to a file kept outside Slack"
        if kind == "unsupported":
            return unsupported_reason(file.name, file.mimetype, file.filetype)
        if kind == "audio" and not self._transcribe_model:
            return "a voice clip, and transcription is not set up"
        if file.size > self._limits.max_bytes:
            return f"over the {_megabytes(self._limits.max_bytes)} limit"
        return ""

    async def _download(self, file: SlackFile) -> bytes | str:
        """The file's bytes, or why they could not be had."""
        try:
            return await self._slack.download(
                file, max_bytes=self._limits.max_bytes, timeout_seconds=self._limits.timeout_seconds
            )
        except SlackError as exc:
            log.info("could not download a file: %s", exc.error)
            if exc.error == "too_large":
                return f"over the {_megabytes(self._limits.max_bytes)} limit"
            return _DOWNLOAD_PROBLEMS.get(exc.error, "the download from Slack failed")

    async def _convert(self, file: SlackFile, data: bytes) -> Converted:
        async with self._converting:
            return await convert_in_child(
                data,
                name=file.name,
                mimetype=file.mimetype,
                filetype=file.filetype,
                timeout_seconds=self._limits.timeout_seconds,
                memory_bytes=MEMORY_BYTES,
            )

    async def _document(self, label: str, file: SlackFile, text: str, detail: str) -> str:
        """A document (or a transcript) as the model reads it: a header, then its text cut to the token
        limit, the header saying so."""
        limit = self._limits.max_tokens
        head = text[: limit * CHARS_PER_TOKEN_READ]
        kept = await asyncio.to_thread(self._counter.truncate, head, limit)
        header = f"[{label}: {file.name}, {detail}" if detail else f"[{label}: {file.name}"
        if len(kept) < len(text):
            header += f"; only its first {limit:,} tokens"
        return f"{header}]\n{kept}"

    async def _transcript(self, file: SlackFile, data: bytes) -> Attachment:
        assert self._transcribe_model is not None
        try:
            text = await transcribe(self._openai, self._transcribe_model, file.name, data)
        except ModelError as exc:
            log.warning("could not transcribe a voice clip: %s", exc.kind)
            return _unreadable(file, "a voice clip the transcription service could not read")
        return Attachment(file, await self._document("voice clip", file, text, "transcribed"))

    async def _cache(self, key: ThreadKey, file_id: str, url: str, *, just_read: bool = False) -> None:
        """Keep a scaled image for the thread's next replies (and, when Redis keeps none, one just read
        for the reply that read it)."""
        if self._limits.picture_cache_seconds <= 0:
            if just_read:
                self._fresh[(key, file_id)] = url
                while len(self._fresh) > FRESH_KEPT:  # read but never shown (the model sees no images)
                    self._fresh.popitem(last=False)
            return
        with redis_errors("caching an image"):
            await self._redis.set(self._picture_key(key, file_id), url, ex=self._limits.picture_cache_seconds)

    async def _remember(self, key: ThreadKey, files: Iterable[SlackFile]) -> None:
        """Note which thread holds each file, for when it is deleted in Slack."""
        with redis_errors("indexing files"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for file in files:
                    index = self._index_key(key.team, file.id)
                    pipe.sadd(index, f"{key.channel}:{key.thread_ts}")
                    pipe.expire(index, self._limits.thread_ttl_seconds)
                await pipe.execute()

    async def threads_holding(self, team: str, file_id: str) -> list[ThreadKey]:
        """The threads whose history holds file ``file_id``."""
        with redis_errors("reading a file's threads"):
            members = await self._redis.smembers(self._index_key(team, file_id))
        threads = [str(member).split(":", 1) for member in members]
        return [ThreadKey(team, channel, thread_ts) for channel, thread_ts in threads]

    async def forget(self, key: ThreadKey, file_ids: Iterable[str]) -> None:
        """Forget files of a thread: their cached images, and the thread in their indexes."""
        with redis_errors("forgetting files"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for file_id in set(file_ids):
                    pipe.delete(self._picture_key(key, file_id))
                    pipe.srem(self._index_key(key.team, file_id), f"{key.channel}:{key.thread_ts}")
                await pipe.execute()


def file_ids(turns: Iterable[Turn]) -> set[str]:
    return {a.file.id for turn in turns for a in turn.attachments}


def _unreadable(file: SlackFile, problem: str) -> Attachment:
    return Attachment(file, f"[file: {file.name}, not read: {problem}]", problem=problem)


def _data_url(converted: Converted) -> str:
    return f"data:{converted.mime};base64,{base64.b64encode(converted.image).decode()}"


def _megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:g} MB"
