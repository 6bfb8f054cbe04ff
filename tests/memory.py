"""Small hand-written in-memory fakes of the protocols in ``bot.domain``, for unit tests of the pipeline.

Each fake does the least that honours its protocol and records what it was asked, so tests assert on
behaviour: ``MemoryHistory`` (turns, per-thread lock, job progress), ``ScriptedModel`` (scripted chunks
or a scripted ``ModelError``), ``RecordingSlack`` with its ``RecordingReply``, ``StaticPersonas``,
``ShelfFiles`` (prepared attachments) and ``WordCounter`` (one word is one token). No ``unittest.mock``
anywhere.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from bot.domain import (
    Attachment,
    ChatMessage,
    Incoming,
    JobProgress,
    Persona,
    Rated,
    Recall,
    ReplyLog,
    SlackFile,
    SlackMessage,
    StreamEnd,
    ThreadHold,
    ThreadKey,
    Turn,
    Usage,
)
from bot.errors import ModelError, ModelErrorKind

BOT_USER_ID = "UBOT"


class MemoryHistory:
    """Implements ``History`` in dictionaries; ``turns[key]`` is a thread's turns, oldest first."""

    def __init__(self) -> None:
        self.turns: defaultdict[ThreadKey, list[Turn]] = defaultdict(list)
        self.progresses: defaultdict[tuple[ThreadKey, str], dict[str, object]] = defaultdict(dict)
        self.recent_budgets: list[int] = []  # the token_budget of every recent() call, in order
        self._locks: defaultdict[ThreadKey, asyncio.Lock] = defaultdict(asyncio.Lock)

    @asynccontextmanager
    async def lock(self, key: ThreadKey) -> AsyncIterator[ThreadHold]:
        async with self._locks[key]:
            yield ThreadHold("")

    async def recall(self, key: ThreadKey, token_budget: int, *, without_ts: str = "") -> Recall:
        """The first turn, then newest first, stopping right after the turn that takes the total past
        ``token_budget``; no summaries."""
        self.recent_budgets.append(token_budget)
        turns = [t for t in self.turns[key] if not (without_ts and t.ts == without_ts)]
        found: list[Turn] = []
        positions: list[int] = []
        total = 0
        for position in range(len(turns) - 1, 0, -1):
            found.append(turns[position])
            positions.append(position)
            total += turns[position].tokens
            if total > token_budget:
                break
        first = turns[0] if turns else None
        return Recall(tuple(found), tuple(positions), first, remembered=bool(self.turns[key]))

    async def seed(self, key: ThreadKey, turns: Sequence[Turn]) -> None:
        self.turns[key].extend(turns)

    async def progress(self, key: ThreadKey, job_id: str) -> JobProgress:
        fields = self.progresses[(key, job_id)]
        parts = fields.get("parts", {})
        assert isinstance(parts, dict)
        return JobProgress(
            question_stored="question" in fields,
            answered="answer" in fields,
            parts=tuple(parts[i] for i in range(len(parts))),
        )

    async def store_question(self, key: ThreadKey, job_id: str, turn: Turn) -> None:
        self._store_once(key, job_id, "question", turn)

    async def store_answer(
        self, key: ThreadKey, job_id: str, turn: Turn, *, releasing: ThreadHold | None = None
    ) -> None:
        self._store_once(key, job_id, "answer", turn)  # the lock is let go when its block ends

    def _store_once(self, key: ThreadKey, job_id: str, field: str, turn: Turn) -> None:
        if field not in self.progresses[(key, job_id)]:
            self.progresses[(key, job_id)][field] = True
            self.turns[key].append(turn)

    async def record_part(self, key: ThreadKey, job_id: str, index: int, ts: str) -> None:
        parts = self.progresses[(key, job_id)].setdefault("parts", {})
        assert isinstance(parts, dict)
        parts[index] = ts

    async def mark_answered(self, key: ThreadKey, job_id: str) -> None:
        self.progresses[(key, job_id)]["answer"] = True


@dataclass
class ModelCall:
    """What one ``ScriptedModel.stream`` call was given."""

    messages: list[ChatMessage]
    persona: Persona


@dataclass
class _Script:
    chunks: list[str]
    end: StreamEnd
    error: ModelError | None = None


class ScriptedModel:
    """Implements ``ChatModel``: each call plays the next scripted answer or raises the next error."""

    def __init__(self, *, sees_images: bool = False) -> None:
        self.calls: list[ModelCall] = []
        self._scripts: list[_Script] = []
        self.images = sees_images

    def answer(self, *chunks: str, finish_reason: str | None = "stop", usage: Usage | None = None) -> None:
        """Queue an answer streamed as ``chunks``, then a ``StreamEnd``."""
        self._scripts.append(_Script(list(chunks), StreamEnd(finish_reason, usage)))

    def fail(self, kind: ModelErrorKind) -> None:
        """Queue a call that raises ``ModelError(kind)`` before any text."""
        self._scripts.append(_Script([], StreamEnd(None, None), ModelError(kind, "scripted")))

    @property
    def pending(self) -> int:
        """Scripted calls not made yet."""
        return len(self._scripts)

    def model_for(self, persona: Persona) -> str:
        return persona.model or "scripted-model"

    def reply_cap(self, persona: Persona) -> int | None:
        return persona.max_tokens

    def sees_images(self, persona: Persona) -> bool:
        return self.images if persona.vision is None else persona.vision == "on"

    async def stream(
        self, messages: Sequence[ChatMessage], persona: Persona, end_user: str = ""
    ) -> AsyncIterator[str | StreamEnd]:
        self.calls.append(ModelCall(list(messages), persona))
        if not self._scripts:
            raise AssertionError("the model was called more often than scripted")
        script = self._scripts.pop(0)
        if script.error is not None:
            raise script.error
        for chunk in script.chunks:
            yield chunk
        yield script.end


@dataclass
class RecordingReply:
    """Implements ``ReplyStream`` by recording each call as ``(method, argument)``; writes one part."""

    incoming: Incoming | None  # None for a private reply (through a response URL)
    log: ReplyLog
    events: list[tuple[str, str | None]] = field(default_factory=list)
    rated: Rated | None = None  # what the finished answer may be rated under

    async def thinking(self, title: str | None = None) -> None:
        self.events.append(("thinking", title))

    async def append(self, text: str) -> None:
        self.events.append(("append", text))

    async def finish(self, footnote: str | None = None, rated: Rated | None = None) -> None:
        self.events.append(("finish", footnote))
        self.rated = rated

    async def fail(self, message: str) -> None:
        self.events.append(("fail", message))

    async def notice(self, text: str) -> None:
        self.events.append(("notice", text))
        if not self.log.parts:
            await self.log.record(0, f"notice-{self.incoming.ts if self.incoming else 'private'}")

    @property
    def text(self) -> str:
        """Everything appended, joined."""
        return "".join(arg or "" for name, arg in self.events if name == "append")

    @property
    def methods(self) -> list[str]:
        """The names of the calls, in order."""
        return [name for name, _ in self.events]


async def _record_nothing(index: int, ts: str) -> None:
    pass


_USER_MENTION = re.compile(r"<@(U[A-Z0-9]+)(?:\|[^>]*)?>")


class RecordingSlack:
    """Implements ``SlackPort`` from a name table and a scripted thread, recording what it is asked."""

    def __init__(
        self,
        names: Mapping[str, str] | None = None,
        thread: Sequence[SlackMessage] = (),
        bot_user_id: str = BOT_USER_ID,
    ) -> None:
        self.names = dict(names or {})
        self.thread = list(thread)
        self.bot_user_id = bot_user_id
        self.replies: list[RecordingReply] = []
        self.private_replies: list[tuple[str, RecordingReply]] = []  # (response URL, reply)
        self.thread_reads: list[ThreadKey] = []
        self.language = "English"

    async def readable(self, team: str, text: str) -> str:
        def name(match: re.Match[str]) -> str:
            user = match.group(1)
            return "" if user == self.bot_user_id else "@" + self.names.get(user, user)

        return re.sub(r"[ \t]{2,}", " ", _USER_MENTION.sub(name, text)).strip()

    async def display_name(self, team: str, user_id: str) -> str:
        return self.names.get(user_id, user_id)

    async def thread_messages(self, key: ThreadKey) -> list[SlackMessage]:
        self.thread_reads.append(key)
        return list(self.thread)

    def reply_stream(self, incoming: Incoming, log: ReplyLog) -> RecordingReply:
        reply = RecordingReply(incoming, log)
        self.replies.append(reply)
        return reply

    def private_reply(self, response_url: str) -> RecordingReply:
        reply = RecordingReply(None, ReplyLog("private", 1, (), _record_nothing))
        self.private_replies.append((response_url, reply))
        return reply

    async def user_language(self, user_id: str) -> str:
        return self.language


class ShelfFiles:
    """Implements ``FileReader`` from attachments prepared per file id; records what it was asked."""

    def __init__(self, attachments: Sequence[Attachment] = (), urls: Mapping[str, str] | None = None) -> None:
        self.attachments = {a.file.id: a for a in attachments}
        self.urls = dict(urls or {})  # file id -> data URL (a missing one is "no longer available")
        self.reads: list[list[str]] = []  # the file ids of each read()
        self.url_requests: list[list[str]] = []

    async def read(self, key: ThreadKey, files: Sequence[SlackFile]) -> list[Attachment]:
        self.reads.append([f.id for f in files])
        return [self.attachments[f.id] for f in files]

    async def picture_urls(self, key: ThreadKey, pictures: Sequence[Attachment]) -> dict[str, str]:
        self.url_requests.append([a.file.id for a in pictures])
        return {a.file.id: self.urls[a.file.id] for a in pictures if a.file.id in self.urls}


class StaticPersonas:
    """Implements ``PersonaSource``: a persona per channel, else the default."""

    def __init__(self, default: Persona, channels: Mapping[str, Persona] | None = None) -> None:
        self.default = default
        self.channels = dict(channels or {})

    async def resolve(self, key: ThreadKey, requested: str | None = None, *, pin: bool = True) -> Persona:
        return self.channels.get(key.channel, self.default)


_WORD = re.compile(r"\S+")


class WordCounter:
    """Implements ``TokenCounter`` with one word per token and 3 + 1 (role) tokens of message overhead."""

    @property
    def encoding_name(self) -> str:
        return "words"

    def message_tokens(self, role: str, content: str) -> int:
        return 3 + 1 + len(content.split())

    def truncate(self, text: str, max_tokens: int) -> str:
        """The prefix of ``text`` up to the end of its ``max_tokens``-th word."""
        words = list(_WORD.finditer(text))
        if len(words) <= max_tokens:
            return text
        if max_tokens <= 0:
            return ""
        return text[: words[max_tokens - 1].end()]
