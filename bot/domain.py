"""The plain values that cross the bot's seams, and the small protocols the pipeline talks to.

Nothing here does I/O. Adapters (``history``, ``llm``, ``slack``, ``personas``, ``tokens``, ``usage``)
implement the protocols; ``conversation`` only ever sees these types, which is what lets it be tested with
in-memory fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict

Role = Literal["user", "assistant"]

# Tokens the API adds to every request to prime the reply (the OpenAI cookbook's count).
REPLY_PRIMING_TOKENS = 3


def valid_text(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate (JSON can carry one, UTF-8 cannot) becomes U+FFFD.

    Every text from Slack or from the model passes here before it is stored or sent: one bad
    character must not make a thread unstorable for good.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@dataclass(frozen=True, slots=True)
class ThreadKey:
    """Where a conversation lives: workspace, channel and the ts of the thread's parent message."""

    team: str
    channel: str
    thread_ts: str


@dataclass(frozen=True, slots=True)
class SlackFile:
    """A file attached to a Slack message, as the event (or ``files.info``) describes it. ``url`` is
    Slack's private download URL ("" when Slack sent only the id); it is never logged."""

    id: str
    name: str
    mimetype: str = ""
    filetype: str = ""
    size: int = 0
    url: str = ""
    mode: str = "hosted"  # hosted, snippet, external (a link to another service), tombstone (deleted)


@dataclass(frozen=True, slots=True)
class Picture:
    """An image the model can see: its size once scaled for the model, the tokens it takes of the
    model's context, and the tokens the API bills for it (more, for some models)."""

    mime: str
    width: int
    height: int
    tokens: int
    billed: int


@dataclass(frozen=True, slots=True)
class Attachment:
    """What the bot read of one file of a message, stored with the message's turn.

    ``text`` is what the model reads of it: a header naming the file (``[file: spec.pdf, 12 pages]``),
    then, for documents, their text cut to the file token limit. ``picture`` is set for an image the
    model may see; ``problem`` says why the file could not be read ("" when it was).
    """

    file: SlackFile
    text: str
    picture: Picture | None = None
    problem: str = ""


UNCOUNTED = ""  # a Turn's encoding before its tokens are counted (the history counts it when needed)


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored message of a thread, with its token cost counted once (its text, the text of its
    files, and its images): when it was stored, or, for a thread read from Slack, when first needed."""

    role: Role
    text: str
    tokens: int
    encoding: str
    ts: str = ""
    speaker_id: str = ""
    speaker_name: str = ""
    attachments: tuple[Attachment, ...] = ()

    @property
    def content(self) -> str:
        """The message as the model reads it: human turns carry their speaker's name, then what the
        bot read of their files."""
        text = f"{self.speaker_name}: {self.text}" if self.role == "user" and self.speaker_name else self.text
        return "\n\n".join([text, *(a.text for a in self.attachments)]) if self.attachments else text

    @property
    def picture_tokens(self) -> int:
        """What the turn's images cost, part of ``tokens`` (not spent when the model sees no images)."""
        # Most turns have no files: trimming asks this of every turn it considers.
        if not self.attachments:
            return 0
        return sum(a.picture.tokens for a in self.attachments if a.picture is not None)

    @property
    def pictures(self) -> tuple[Attachment, ...]:
        if not self.attachments:
            return ()
        return tuple(a for a in self.attachments if a.picture is not None)


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ImageURL(TypedDict):
    url: str
    detail: Literal["low", "high", "auto"]


class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(TypedDict):
    """One message of a Chat Completions request: text, or text and images."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A Slack message the bot may answer, already parsed from the event."""

    key: ThreadKey
    ts: str
    user_id: str
    text: str
    addressed: bool
    is_dm: bool
    files: tuple[SlackFile, ...] = ()

    @property
    def in_thread(self) -> bool:
        """True when the message is a reply inside an existing thread, not the thread's parent."""
        return self.key.thread_ts != self.ts

    @property
    def dedup_key(self) -> str:
        """Identifies the message itself: app_mention and message events for it share this key."""
        return f"{self.key.channel}:{self.ts}"


@dataclass(frozen=True, slots=True)
class Deletion:
    """Something people deleted in Slack that the bot forgets too: a message of a thread the bot
    keeps (``key`` and ``ts``; the whole thread when it was the thread's parent), or a file
    (``file_id``), wherever the bot keeps it."""

    team: str
    key: ThreadKey | None = None
    ts: str = ""
    file_id: str = ""

    @property
    def dedup_key(self) -> str:
        """Identifies the deletion, as ``Incoming.dedup_key`` does a message."""
        if self.file_id:
            return f"file:{self.file_id}"
        return f"deleted:{self.key.channel if self.key else ''}:{self.ts}"


@dataclass(frozen=True, slots=True)
class Edit:
    """A message of a thread the bot keeps, edited in Slack: its stored turn takes the new ``text``
    (Slack markup, as in ``Incoming.text``)."""

    key: ThreadKey
    ts: str  # the message
    text: str
    edited_at: str  # the edit's own ts: each edit of a message is a job of its own

    @property
    def team(self) -> str:
        return self.key.team

    @property
    def dedup_key(self) -> str:
        return f"edited:{self.key.channel}:{self.ts}:{self.edited_at}"


# Changes made in Slack that the bot carries out in its memory; nobody waits for an answer to them.
Change = Deletion | Edit


ShortcutKind = Literal["ask", "summarize", "translate", "start_over"]  # the last is no job: erasure.py


@dataclass(frozen=True, slots=True)
class Shortcut:
    """Someone used one of the bot's message shortcuts on a message: ``ask`` a question about it,
    ``summarize`` the thread it belongs to, or ``translate`` it. The answer goes into the message's
    thread, or, ``only_me``, only to them (through the shortcut's ``response_url``)."""

    kind: ShortcutKind
    id: str  # one use of a shortcut (a retried submission is queued once)
    key: ThreadKey  # the message's thread
    ts: str  # the message
    user_id: str  # who used the shortcut
    author: str  # who wrote the message: a user or bot id, "" when Slack does not say
    text: str  # the message's text, as Slack sent it
    response_url: str
    files: tuple[SlackFile, ...] = ()
    question: str = ""  # ``ask``: what they want to know about the message
    only_me: bool = True

    @property
    def dedup_key(self) -> str:
        """Identifies the use, as ``Incoming.dedup_key`` does a message."""
        return f"shortcut:{self.id}"

    @property
    def incoming(self) -> Incoming:
        """The shortcut as a message to answer: from whoever used it, addressed to the bot, in the
        message's thread; its ts is the message's, since the answer comes after it."""
        return Incoming(
            key=self.key,
            ts=self.ts,
            user_id=self.user_id,
            text=self.question,
            addressed=True,
            is_dm=self.key.channel.startswith("D"),
            files=self.files,
        )


JobRef = tuple[int, str]  # a job's stream and its id in it


@dataclass(frozen=True, slots=True)
class Job:
    """Work the ingress accepted: a message to answer (``Incoming``), a change to carry out (a deletion
    or an edit), or a message shortcut to answer; ``attempt`` counts deliveries."""

    id: str
    work: Incoming | Change | Shortcut
    attempt: int = 1
    enqueued_at: float = 0.0  # wall-clock seconds when the ingress queued it
    stream: int = 0  # which of the workspace's job streams holds it (its id is unique only there)

    @property
    def ref(self) -> JobRef:
        """The job's identity across the workspace's streams: its stream and its id there."""
        return (self.stream, self.id)

    @property
    def incoming(self) -> Incoming:
        """The message of a reply job (a shortcut's, as ``Shortcut.incoming``)."""
        if isinstance(self.work, Shortcut):
            return self.work.incoming
        if not isinstance(self.work, Incoming):
            raise TypeError(f"job {self.id} is not a reply")
        return self.work

    @property
    def label(self) -> str:
        """What the job is about, for logs: a thread key (workspace:channel:thread), or a file."""
        work = self.work
        if work.key is not None:
            return f"{work.key.team}:{work.key.channel}:{work.key.thread_ts}"
        return f"{work.team}:file:{work.file_id}" if isinstance(work, Deletion) else ""


@dataclass(slots=True)
class ThreadHold:
    """A reply's hold on its thread's lock, as ``History.lock`` gives it: the token that proves it is
    this reply's, and whether storing the answer already let the thread go."""

    token: str
    released: bool = False


@dataclass(frozen=True, slots=True)
class JobProgress:
    """What earlier attempts of a job already did in its thread, so a retry never does it twice."""

    question_stored: bool = False
    answered: bool = False
    parts: tuple[str, ...] = ()  # the ts of each Slack message written for the job, in order


@dataclass(frozen=True, slots=True)
class ReplyLog:
    """Where a reply's Slack messages are remembered while it is written: a retried job rewrites the
    messages of the attempt before it instead of posting again."""

    job_id: str
    attempt: int
    parts: tuple[str, ...]
    record: Callable[[int, str], Awaitable[None]]  # (part index, message ts) -> remembered


@dataclass(frozen=True, slots=True)
class Persona:
    """A system prompt and the model parameters it sets; ``None`` means "not sent to the API"."""

    name: str
    system_prompt: str
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] | None = None
    logit_bias: dict[str, int] | None = None
    seed: int | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    vision: Literal["auto", "on", "off"] | None = None
    suggested_prompts: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one reply: the API's own figures, or counted with tiktoken (``estimated``)."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a model stream: why it ended, what it cost, which model answered."""

    finish_reason: str | None
    usage: Usage | None
    model: str = ""


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """Whether a reply may run; a refusal's ``message``, an 80% ``notice``, and what was reserved."""

    allowed: bool
    message: str = ""
    notice: str | None = None
    reserved: int = 0
    reserved_micro_usd: int = 0


class TokenCounter(Protocol):
    """Counts chat-message tokens with one encoding."""

    @property
    def encoding_name(self) -> str: ...

    def message_tokens(self, role: str, content: str) -> int:
        """Tokens one chat message costs in a prompt, overhead included."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` of at most ``max_tokens`` tokens, cut at a token boundary."""
        ...


@dataclass(frozen=True, slots=True)
class Recall:
    """What a thread's memory offers a context: its first message (kept word for word), the summary of
    the turns after it up to ``summarized_until`` (a list position), and the newest turns since, newest
    first, with their positions in the thread (for the summary to know what a context left out)."""

    turns: tuple[Turn, ...] = ()
    positions: tuple[int, ...] = ()
    first: Turn | None = None
    summary: str = ""
    summary_tokens: int = 0
    summarized_until: int = 1
    noted: bool = False  # a summary was made once: the footnote saying so is not given again
    remembered: bool = False  # anything of the thread is stored (turns or a memory hash)

    def left_out(self, kept: int) -> range:
        """The positions neither summarized nor among the ``kept`` newest turns of a context."""
        oldest_kept = self.positions[kept - 1] if kept else (self.positions[0] + 1 if self.positions else 1)
        return range(max(self.summarized_until, 1), oldest_kept)


class Summaries(Protocol):
    """Keeps each long thread's rolling summary, after the replies that leave older turns out."""

    async def catch_up(self, key: ThreadKey, user_id: str, persona: Persona, left_out: range) -> None:
        """Summarize the turns at ``left_out`` (positions) into the thread's summary; never raises."""
        ...


class History(Protocol):
    """Thread memory and the per-thread lock; a job's progress in its thread."""

    def lock(self, key: ThreadKey) -> AbstractAsyncContextManager[ThreadHold]:
        """Hold the thread so replies in it happen one at a time, across workers."""
        ...

    async def recall(self, key: ThreadKey, token_budget: int, *, without_ts: str = "") -> Recall:
        """The thread's first message, its summary, and its newest turns not summarized (newest first,
        reading only as many as can fill ``token_budget``, plus one); ``without_ts`` is a message
        left out (the question, when an earlier attempt stored it). Its ``remembered`` says whether
        anything of the thread is stored, so that a reply learns it in the same round trip."""
        ...

    async def seed(self, key: ThreadKey, turns: Sequence[Turn]) -> None:
        """Store what was said in a thread before the bot was asked there (read from Slack)."""
        ...

    async def progress(self, key: ThreadKey, job_id: str) -> JobProgress: ...

    async def store_question(self, key: ThreadKey, job_id: str, turn: Turn) -> None:
        """Store a job's question; once per job, however often it is tried."""
        ...

    async def store_answer(
        self, key: ThreadKey, job_id: str, turn: Turn, *, releasing: ThreadHold | None = None
    ) -> None:
        """Store a job's complete answer and mark the job answered; in the same step, let go of the
        thread's lock held as ``releasing`` (the answer is the last thing a reply stores under it)."""
        ...

    async def record_part(self, key: ThreadKey, job_id: str, index: int, ts: str) -> None:
        """Remember the ts of a Slack message written for a job (see ``ReplyLog``)."""
        ...

    async def mark_answered(self, key: ThreadKey, job_id: str) -> None:
        """Mark a job answered without storing its answer (a shortcut's answer is not a thread turn)."""
        ...


class ChatModel(Protocol):
    """The model boundary: one method that yields text chunks, then a ``StreamEnd``."""

    def model_for(self, persona: Persona) -> str:
        """The model a reply with ``persona`` will ask for."""
        ...

    def sees_images(self, persona: Persona) -> bool:
        """True when a reply with ``persona`` may send the model images."""
        ...

    def reply_cap(self, persona: Persona) -> int | None:
        """The most tokens a reply with ``persona`` may have, when anything caps it."""
        ...

    def stream(
        self, messages: Sequence[ChatMessage], persona: Persona, end_user: str = ""
    ) -> AsyncIterator[str | StreamEnd]:
        """``end_user`` ("team:user") identifies who asked, for the provider's abuse monitoring."""
        ...


class FileReader(Protocol):
    """The files people share: fetched from Slack and turned into text, or images the model can see."""

    async def read(self, key: ThreadKey, files: Sequence[SlackFile]) -> list[Attachment]:
        """What the bot makes of each file of a message in ``key``'s thread, in order; a file it cannot
        read comes back with its ``problem``."""
        ...

    async def picture_urls(self, key: ThreadKey, pictures: Sequence[Attachment]) -> dict[str, str]:
        """File id -> the image as a data URL, for each of ``pictures`` that can still be had."""
        ...


@dataclass(frozen=True, slots=True)
class ChannelExcerpt:
    """The recent messages of the channel someone views beside the assistant pane, for a question
    about it: as the model reads them (``text``), and what span they cover; or why it could not be
    read (``problem``)."""

    channel: str
    text: str = ""
    count: int = 0
    oldest: str = ""  # "YYYY-MM-DD HH:MM" UTC
    newest: str = ""
    problem: str = ""


class PaneContext(Protocol):
    """What the assistant pane knows of its threads: the channel the person is looking at."""

    async def channel_excerpt(self, key: ThreadKey, question: str) -> ChannelExcerpt | None:
        """For a question in a pane thread that asks about "this channel": the recent messages of the
        channel the person views; None when the question is not about it or no channel is known."""
        ...


class UsageLedger(Protocol):
    """Usage and cost per reply, and the budgets that gate the next one."""

    async def reserve(self, key: ThreadKey, user: str, model: str, tokens: int) -> BudgetCheck: ...

    async def settle(
        self,
        key: ThreadKey,
        user: str,
        model: str,
        usage: Usage,
        trimmed: int,
        check: BudgetCheck,
        *,
        counted: str = "replies",
    ) -> None: ...

    async def release(self, key: ThreadKey, user: str, check: BudgetCheck) -> None: ...


class PersonaSource(Protocol):
    """Chooses the persona for a thread."""

    async def resolve(self, key: ThreadKey, requested: str | None = None, *, pin: bool = True) -> Persona:
        """The thread's persona; ``requested`` is a name its first message asked for, if any. Without
        ``pin`` a thread that has none pinned gets the channel's, and still none pinned."""
        ...


@dataclass(frozen=True, slots=True)
class SlackMessage:
    """A message read back from a Slack thread, with markup already made readable."""

    ts: str
    role: Role
    speaker_id: str
    speaker_name: str
    text: str
    files: tuple[SlackFile, ...] = ()


@dataclass(frozen=True, slots=True)
class Rated:
    """What feedback on an answer is counted under: the persona and model that wrote it, and the day
    (UTC, ``YYYY-MM-DD``) it was written."""

    persona: str
    model: str
    day: str


class ReplyStream(Protocol):
    """Everything the bot writes into a thread for one job: an answer as it streams, or a notice."""

    async def thinking(self, title: str | None = None) -> None:
        """Show that the bot is working, where Slack allows it; ``title`` names the thread (its first
        question, in the assistant pane)."""
        ...

    async def append(self, text: str) -> None: ...

    async def finish(self, footnote: str | None = None, rated: Rated | None = None) -> None:
        """End the answer, adding ``footnote`` as its last line when given; with ``rated``, people may
        say whether it helped (where the bot asks for feedback)."""
        ...

    async def fail(self, message: str) -> None:
        """End the answer with an explanation instead of (or after) partial text."""
        ...

    async def notice(self, text: str) -> None:
        """Say ``text`` instead of answering (a hint, a refusal, an apology); not an answer."""
        ...


class SlackPort(Protocol):
    """What the pipeline needs from Slack."""

    async def readable(self, team: str, text: str) -> str:
        """Slack markup turned into plain readable text, the bot's own mention removed."""
        ...

    async def display_name(self, team: str, user_id: str) -> str: ...

    async def thread_messages(self, key: ThreadKey) -> list[SlackMessage]: ...

    def reply_stream(self, incoming: Incoming, log: ReplyLog) -> ReplyStream: ...


class ShortcutSlack(Protocol):
    """What answering a message shortcut needs from Slack besides ``SlackPort``."""

    def private_reply(self, response_url: str) -> ReplyStream:
        """What the bot says for a job only to the person who asked, through ``response_url``; written
        whole once complete (Slack cannot edit it)."""
        ...

    async def user_language(self, user_id: str) -> str:
        """The language ``user_id`` uses Slack in (from their locale), in English words."""
        ...
