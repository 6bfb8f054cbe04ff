"""Everything that knows Slack's JSON and Web API.

- ``parse_event``: a Bolt event payload -> ``Incoming`` (or None for anything the bot must not answer:
  its own and other bots' messages, edits, deletions and other subtypes, channel chatter).
- ``SlackAdapter``: implements ``domain.SlackPort``: markup made readable (user mentions as display
  names, cached in Redis), reading a thread with ``conversations.replies``, reply streams.
- ``SlackReplyStream``: one answer written into a thread while the model produces it: Slack's native
  streaming (``chat.startStream``/``appendStream``/``stopStream``) or, when Slack refuses it, one post
  edited with ``chat.update``; at most one write a second after the first, and a new message whenever
  the text outgrows one Slack message, split at a Markdown block boundary, never inside a code block.
  Its messages carry metadata naming their job, and a retried job rewrites them rather than posting.
- ``web_client``: the Web API client every part of the bot uses: retries that never post twice, and
  failures counted by method.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
from cachetools import TTLCache
from markdown_it import MarkdownIt
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.domain import (
    Change,
    Deletion,
    Edit,
    Incoming,
    Rated,
    ReplyLog,
    Shortcut,
    ShortcutKind,
    SlackFile,
    SlackMessage,
    ThreadKey,
    valid_text,
)
from bot.errors import SlackError
from bot.observability import SLACK_ERRORS

log = logging.getLogger(__name__)

# Blocks shown under a finished answer (the feedback buttons), from what it may be rated under.
AnswerBlocks = Callable[[Rated], list[dict[str, Any]]]
StreamMode = Literal["auto", "native", "update", "off"]

# The bot token scopes manifest.yaml asks for (a test keeps the two the same); `check` compares.
REQUIRED_SCOPES = (
    "app_mentions:read",
    "channels:history",
    "groups:history",
    "im:history",
    "mpim:history",
    "chat:write",
    "users:read",
    "assistant:write",
    "commands",
    "channels:read",
    "groups:read",
    "im:write",
    "mpim:read",
    "usergroups:read",
    "files:read",
)

MESSAGE_LIMIT = 12_000  # Slack's limit for markdown_text
SPLIT_AT = MESSAGE_LIMIT - 100
FENCE_RESERVE = 8  # room to close a code fence at a cut
FLUSH_INTERVAL_SECONDS = 1.0
THINKING_STATUS = "is thinking…"
LOADING_MESSAGES = ("Reading the thread…", "Thinking…", "Writing the answer…")

# Message subtypes that are still a person saying something new.
_ANSWERABLE_SUBTYPES = {None, "file_share", "thread_broadcast"}
# Messages worth remembering when reading a thread back: those, and other bots' posts.
_READABLE_SUBTYPES = _ANSWERABLE_SUBTYPES | {"bot_message"}
_MARKUP = re.compile(r"<([^<>]+)>")
_SPACES = re.compile(r"[ \t]{2,}")
_markdown = MarkdownIt("commonmark")


_SLACK_ID = r"^[A-Z0-9]{2,32}$"  # U…, W…, B…, C…, D…, G…, T…, E…
_SLACK_TS = r"^[0-9]{1,12}\.[0-9]{1,9}$"
SlackId = Annotated[str, Field(pattern=_SLACK_ID)]
SlackTs = Annotated[str, Field(pattern=_SLACK_TS)]


class _File(BaseModel):
    """A file of a message event, as far as the bot uses it."""

    model_config = ConfigDict(extra="ignore")

    id: SlackId
    name: StrictStr = ""
    title: StrictStr = ""
    mimetype: StrictStr = ""
    filetype: StrictStr = ""
    size: Annotated[StrictInt, Field(ge=0)] = 0
    mode: StrictStr = "hosted"
    url_private_download: StrictStr = ""
    url_private: StrictStr = ""

    def value(self) -> SlackFile:
        name = valid_text(self.name or self.title or self.id)[:200]
        url = self.url_private_download or self.url_private
        return SlackFile(self.id, name, self.mimetype, self.filetype, self.size, url, self.mode)


class _Message(BaseModel):
    """The fields of a message the bot relies on, in an event or a shortcut, each checked (extra fields
    are Slack's own)."""

    model_config = ConfigDict(extra="ignore")

    ts: SlackTs
    thread_ts: SlackTs | None = None
    text: StrictStr = ""
    files: list[_File] = []


class _MessageEvent(_Message):
    type: Literal["app_mention", "message"]
    user: SlackId
    channel: SlackId
    channel_type: StrictStr | None = None


class _Deleted(BaseModel):
    """A ``message_deleted`` event: which message, and the thread it was in."""

    model_config = ConfigDict(extra="ignore")

    channel: SlackId
    deleted_ts: SlackTs
    previous_message: dict[str, Any] = {}


class _Edited(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ts: SlackTs


class _EditedMessage(_Message):
    user: SlackId
    edited: _Edited
    bot_id: StrictStr | None = None


class _Changed(BaseModel):
    """A ``message_changed`` event: the message as it is now, and as it was."""

    model_config = ConfigDict(extra="ignore")

    channel: SlackId
    message: _EditedMessage
    previous_message: dict[str, Any] = {}


class _FileDeleted(BaseModel):
    model_config = ConfigDict(extra="ignore")

    file_id: SlackId


class _Id(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: SlackId


class _Container(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_ts: SlackTs
    channel_id: SlackId
    thread_ts: SlackTs | None = None


class _Action(BaseModel):
    model_config = ConfigDict(extra="ignore")

    value: Annotated[StrictStr, Field(max_length=2000)]


class _MessageAction(BaseModel):
    """A ``block_actions`` payload from a button on one of the bot's messages."""

    model_config = ConfigDict(extra="ignore")

    team: _Id
    user: _Id
    container: _Container
    actions: Annotated[list[_Action], Field(min_length=1)]
    trigger_id: StrictStr = ""


@dataclass(frozen=True, slots=True)
class ButtonClick:
    """Someone clicked a button on a message: who, on which message (and its thread), the button's
    value, and the trigger for opening a modal."""

    team: str
    user: str
    channel: str
    message_ts: str
    thread_ts: str
    value: str
    trigger_id: str


def parse_button_click(body: Mapping[str, Any]) -> ButtonClick | None:
    """The click in a ``block_actions`` payload from a message's button, if it is well formed."""
    try:
        payload = _MessageAction.model_validate(body)
    except ValidationError as exc:
        _malformed("block_actions", exc)
        return None
    container = payload.container
    return ButtonClick(
        team=payload.team.id,
        user=payload.user.id,
        channel=container.channel_id,
        message_ts=container.message_ts,
        thread_ts=container.thread_ts or container.message_ts,
        value=payload.actions[0].value,
        trigger_id=payload.trigger_id,
    )


class _ShortcutMessage(_Message):
    user: SlackId | None = None
    bot_id: SlackId | None = None


class _MessageShortcut(BaseModel):
    """A ``message_action`` payload: someone used a message shortcut of the bot's on a message."""

    model_config = ConfigDict(extra="ignore")

    team: _Id
    user: _Id
    channel: _Id
    message: _ShortcutMessage
    response_url: Annotated[StrictStr, Field(pattern=r"^https?://[^\s]+$", max_length=1000)]
    trigger_id: StrictStr = ""


def parse_message_shortcut(body: Mapping[str, Any], kind: ShortcutKind) -> tuple[Shortcut, str] | None:
    """The shortcut in a ``message_action`` payload (answered only to its user until they say
    otherwise) and its trigger for opening a modal, if the payload is well formed."""
    try:
        payload = _MessageShortcut.model_validate(body)
    except ValidationError as exc:
        _malformed("message_action", exc)
        return None
    message = payload.message
    shortcut = Shortcut(
        kind=kind,
        id=uuid.uuid4().hex,
        key=ThreadKey(payload.team.id, payload.channel.id, message.thread_ts or message.ts),
        ts=message.ts,
        user_id=payload.user.id,
        author=message.user or message.bot_id or "",
        text=valid_text(message.text),
        response_url=payload.response_url,
        files=tuple(f.value() for f in message.files if f.mode != "tombstone"),
    )
    return shortcut, payload.trigger_id


# The languages Slack's interface comes in (a person's locale), by language tag.
_LANGUAGES = {
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "pt": "Portuguese",
    "zh-cn": "Simplified Chinese",
    "zh-tw": "Traditional Chinese",
    "ru": "Russian",
    "nl": "Dutch",
    "pl": "Polish",
    "sv": "Swedish",
    "tr": "Turkish",
}
DEFAULT_LANGUAGE = "English"


def language_of(locale: str) -> str:
    """A Slack locale (``fr-FR``) as a language the model understands (``French``)."""
    if not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*", locale):
        return DEFAULT_LANGUAGE
    tag = locale.lower()
    return _LANGUAGES.get(tag[:5]) or _LANGUAGES.get(tag.split("-")[0]) or f"the language of locale {locale}"


class _PaneContext(BaseModel):
    model_config = ConfigDict(extra="ignore")

    channel_id: SlackId | None = None


class _AssistantThread(BaseModel):
    model_config = ConfigDict(extra="ignore")

    user_id: SlackId
    channel_id: SlackId
    thread_ts: SlackTs
    context: _PaneContext = _PaneContext()


class _AssistantThreadEvent(BaseModel):
    """An ``assistant_thread_started`` or ``..._context_changed`` event, as far as the bot uses it."""

    model_config = ConfigDict(extra="ignore")

    team_id: SlackId
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AssistantThread:
    """A thread someone opened with the bot in the assistant pane (in their DM with it), and the
    channel they are looking at beside it, if any."""

    team: str
    user: str
    channel: str
    thread_ts: str
    viewing: str | None


def parse_assistant_thread(body: Mapping[str, Any]) -> AssistantThread | None:
    """The thread an ``assistant_thread_started`` or ``assistant_thread_context_changed`` event names,
    if it is well formed; only a channel (not a DM) counts as viewed."""
    try:
        outer = _AssistantThreadEvent.model_validate(body)
        thread = _AssistantThread.model_validate(outer.event.get("assistant_thread") or {})
    except ValidationError as exc:
        _malformed("assistant_thread", exc)
        return None
    viewing = thread.context.channel_id
    if viewing is not None and not viewing.startswith(("C", "G")):
        viewing = None
    return AssistantThread(outer.team_id, thread.user_id, thread.channel_id, thread.thread_ts, viewing)


def is_slack_id(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(_SLACK_ID, value) is not None


def _malformed(kind: object, exc: ValidationError) -> None:
    fields = sorted({".".join(str(part) for part in error["loc"]) for error in exc.errors()})
    log.warning("dropped a malformed %s event (bad fields: %s)", kind, ", ".join(fields))


def parse_event(event: Mapping[str, Any], *, team: str, bot_user_id: str) -> Incoming | None:
    """The message in an ``app_mention`` or ``message`` event, if the bot may answer it.

    None for anything it must not answer: its own and other bots' messages, edits, deletions and other
    subtypes, channel chatter, and malformed events (logged by which fields, never with content).
    """
    if (
        event.get("type") not in ("app_mention", "message")
        or event.get("subtype") not in _ANSWERABLE_SUBTYPES
        or event.get("bot_id")
        or event.get("user") == bot_user_id
    ):
        return None  # never answer itself or another bot
    try:
        message = _MessageEvent.model_validate(event)
    except ValidationError as exc:
        _malformed(event.get("type"), exc)
        return None
    if not is_slack_id(team):
        log.warning("dropped a %s event from a malformed workspace id", message.type)
        return None
    text = valid_text(message.text)
    thread_ts = message.thread_ts or message.ts
    is_dm = message.channel_type == "im" or message.channel.startswith("D")
    mentioned = message.type == "app_mention" or f"<@{bot_user_id}>" in text
    if not (mentioned or is_dm or thread_ts != message.ts):
        return None  # top-level channel chatter
    return Incoming(
        key=ThreadKey(team=team, channel=message.channel, thread_ts=thread_ts),
        ts=message.ts,
        user_id=message.user,
        text=text,
        addressed=mentioned or is_dm,
        is_dm=is_dm,
        files=tuple(f.value() for f in message.files if f.mode != "tombstone"),
    )


def parse_change(event: Mapping[str, Any], *, team: str) -> Change | None:
    """What a ``message_deleted``, ``message_changed`` or ``file_deleted`` event asks the bot to
    forget or change, if anything: a person's edit of their text (not a bot's update, nor Slack adding
    a link preview), a deleted message or file."""
    if not is_slack_id(team):
        return None
    try:
        if event.get("type") == "file_deleted":
            return Deletion(team, file_id=_FileDeleted.model_validate(event).file_id)
        if event.get("type") != "message":
            return None
        if event.get("subtype") == "message_deleted":
            deleted = _Deleted.model_validate(event)
            thread_ts = deleted.previous_message.get("thread_ts")
            if not (isinstance(thread_ts, str) and re.fullmatch(_SLACK_TS, thread_ts)):
                thread_ts = deleted.deleted_ts  # a message outside a thread is (or starts) its own
            return Deletion(team, ThreadKey(team, deleted.channel, thread_ts), deleted.deleted_ts)
        if event.get("subtype") == "message_changed" and "edited" in (event.get("message") or {}):
            changed = _Changed.model_validate(event)
            message = changed.message
            if message.bot_id or message.text == changed.previous_message.get("text"):
                return None
            key = ThreadKey(team, changed.channel, message.thread_ts or message.ts)
            return Edit(key, message.ts, valid_text(message.text), message.edited.ts)
    except ValidationError as exc:
        _malformed(event.get("type"), exc)
    return None


class NameCache(Protocol):
    """Where display names are remembered between lookups (Redis, in ``history``)."""

    async def cached_name(self, team: str, user_id: str) -> str | None: ...

    async def cache_name(self, team: str, user_id: str, name: str) -> None: ...


def readable_markup(text: str, names: Mapping[str, str], bot_user_id: str) -> str:
    """Slack markup as plain text: ``<@U1>`` -> ``@alice``, ``<#C1|general>`` -> ``#general``, links too."""

    def replace(match: re.Match[str]) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            user = target[1:]
            return "" if user == bot_user_id else "@" + names.get(user, label or user)
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!subteam^"):
            return label or "@group"
        if target.startswith("!date^"):
            return label
        if target.startswith("!"):
            return "@" + target[1:]
        if target.startswith("mailto:"):
            return label or target.removeprefix("mailto:")
        return f"{label} ({target})" if label and label != target else target

    # Most messages have no markup, no entity and no run of spaces: each step runs only when it can
    # change something (a thread read from Slack passes every message here).
    cleaned = _MARKUP.sub(replace, text) if "<" in text else text
    if "  " in cleaned or "\t" in cleaned:
        cleaned = _SPACES.sub(" ", cleaned)
    return (html.unescape(cleaned) if "&" in cleaned else cleaned).strip()


def mentioned_users(text: str) -> set[str]:
    """User ids mentioned with ``<@U…>`` in Slack markup (well-formed ones only)."""
    if "<@" not in text:
        return set()
    found = {m.group(1).partition("|")[0][1:] for m in _MARKUP.finditer(text) if m.group(1).startswith("@")}
    return {user for user in found if is_slack_id(user)}


# What would notify a whole channel or a group: Slack's markup for it, and the bare words Slack may turn
# into it. Person mentions (<@U…>) stay: they notify one person, who is in the conversation anyway.
_BROADCAST = re.compile(
    r"<!(?P<special>channel|here|everyone)(?:\|[^<>]*)?>"
    r"|<!subteam\^[A-Za-z0-9]+(?:\|@?(?P<group>[^<>]*))?>"
    r"|(?<![\w@])@(?P<word>channel|here|everyone)\b"
)
WORD_JOINER = "\u2060"  # invisible; keeps "@here" readable but no longer a mention


def safe_output(text: str) -> str:
    """What the bot posts, made unable to notify a whole channel or group (the words stay readable),
    and valid Unicode."""

    def neutralise(match: re.Match[str]) -> str:
        name = match.group("special") or match.group("word") or match.group("group") or "group"
        return f"@{WORD_JOINER}{name}"

    return _BROADCAST.sub(neutralise, valid_text(text))


class OutputGuard:
    """``safe_output`` for text that arrives in pieces: the end of a piece that may be the start of a
    broadcast mention (``<!he``, ``@ever``) is held back until the next piece shows what it is."""

    HELD_AT_MOST = 64

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        cut = len(text)
        opening = text.rfind("<")
        if opening != -1 and ">" not in text[opening:] and cut - opening <= self.HELD_AT_MOST:
            cut = opening
        at = text.rfind("@", 0, cut)
        if at != -1 and re.fullmatch(r"@[a-z]{0,8}", text[at:cut]):
            cut = at
        self._held = text[cut:]
        return safe_output(text[:cut])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return safe_output(held)


def split_message(text: str, limit: int, floor: int = 0) -> tuple[str, str]:
    """Cut ``text`` into a message of at most ``limit`` characters and the rest.

    The cut is at the last Markdown block boundary that fits (and is past ``floor``, the part already
    sent); inside one huge block it falls back to a line, then a space. A cut inside a code block closes
    the fence in the first part and opens it again in the second, so neither renders as broken code.
    """
    if len(text) <= limit:
        return text, ""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    tokens = _markdown.parse(text)
    blocks = [t for t in tokens if t.level == 0 and t.map is not None and t.nesting >= 0]
    boundaries = [line_starts[t.map[0]] for t in blocks if t.map is not None and t.map[0] < len(line_starts)]
    fitting = [b for b in boundaries if floor < b <= limit]
    if fitting:
        cut = max(fitting)
        return text[:cut], text[cut:]
    # One block is larger than what is left: cut at a line, else a space; a code block cut in two (at any
    # depth, e.g. inside a list item) is closed in the first part and opened again in the second.
    reach = limit - FENCE_RESERVE
    cut = max(text.rfind("\n", floor, reach) + 1 or text.rfind(" ", floor, reach) + 1 or reach, floor + 1)
    head, tail = text[:cut], text[cut:]
    fence = next(
        (
            t
            for t in tokens
            if t.type == "fence"
            and t.map
            and _offset(line_starts, t.map[0]) < cut < _offset(line_starts, t.map[1])
        ),
        None,
    )
    if fence is not None:
        head += ("" if head.endswith("\n") else "\n") + fence.markup
        tail = f"{fence.markup}{fence.info}\n{tail}"
    return head, tail


def _offset(line_starts: list[int], line: int) -> int:
    """Where ``line`` starts; a line past the end starts after the last character."""
    return line_starts[line] if line < len(line_starts) else line_starts[-1] + 10**9


REPLY_EVENT = "sgb_reply"
REPLIES_PAGE = 200  # messages per conversations.replies page (Slack's advice: at most 200)
# A thread the bot never saw is read whole up to this many replies past its first page; beyond, only the
# first page and the newest this many (no context holds more).
NEWEST_READ = 1000
NAME_SECONDS = 60.0  # a renamed person is named anew within this long (the Redis cache keeps a day)
# A reply's messages carry Slack message metadata naming their job, their place in the reply and how
# far it got: "writing" while it streams, "more" for a finished message the answer continues after,
# "done" for its last, "failed" when it ended with an error, "notice" for a hint, refusal or apology.
# Reading a thread back, only the messages of a job that reached "done" count as an answer.
ANSWER_STATES = ("more", "done")
CREATE_ATTEMPTS = 4  # tries of a call that posts a new message, when Slack is failing or unreachable
CREATE_BACKOFF_SECONDS = 0.25


# How a Web API call fails: Slack says no (``ok: false``, or an HTTP error status), or cannot be reached.
_FAILURES = (TimeoutError, SlackApiError, aiohttp.ClientError)


def _transient(exc: BaseException) -> bool:
    """Slack failed or could not be reached, so the call may or may not have taken effect."""
    if isinstance(exc, SlackApiError):
        return int(getattr(exc.response, "status_code", 200) or 200) >= 500
    return isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError)


def _whole_number(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _ts_value(value: Any) -> Decimal:
    """A Slack ts as a number (0 for anything else)."""
    return Decimal(value) if isinstance(value, str) and re.match(_SLACK_TS, value) else Decimal(0)


def _refused(exc: BaseException) -> bool:
    """Slack answered no (not: it failed, was unreachable or rate-limited): asking again gets a no."""
    if not isinstance(exc, SlackApiError):
        return False
    status = int(getattr(exc.response, "status_code", 200) or 200)
    return status < 500 and status != 429 and exc.response.get("error") != "ratelimited"


@dataclass
class ChannelRefusals:
    """Channels where Slack refused something the bot tries on every reply, so that later replies there
    skip the call: native streaming (they post and update instead) and the thinking status. Kept per
    process: a restart, or another worker, asks once again."""

    streaming: set[str] = dataclasses.field(default_factory=set)
    status: set[str] = dataclasses.field(default_factory=set)


def _slack_error(method: str, exc: Exception) -> SlackError:
    if isinstance(exc, SlackApiError):
        status = int(getattr(exc.response, "status_code", 200) or 200)
        error = str(exc.response.get("error") or f"HTTP {status}")
    else:
        error = _unreachable(exc)
    return SlackError(method.replace("_", "."), error, transient=_transient(exc))


def _unreachable(exc: Exception) -> str:
    """Why Slack could not be reached, in words an operator can act on."""
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ClientConnectorCertificateError):
        return "TLS failed (a proxy, or a missing CA certificate?)"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the host name does not resolve"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "the connection was refused"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"the connection failed ({type(exc).__name__})"


def reply_metadata(job_id: str, part: int, state: str) -> dict[str, Any]:
    return {"event_type": REPLY_EVENT, "event_payload": {"job": job_id, "part": part, "state": state}}


class SlackReplyStream:
    """Writes what the bot says for one job into its thread (implements ``domain.ReplyStream``).

    Every message it creates is recorded in the job's ``ReplyLog`` as soon as Slack returns its ts, so
    if the worker dies, the job's next attempt rewrites those messages (``chat.update``) instead of
    posting new ones, and deletes the ones it no longer needs: the thread ends with one answer. A call
    that creates a message and fails in a way that may have created it anyway is retried only after
    looking for the message by its metadata.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        incoming: Incoming,
        mode: StreamMode,
        refusals: ChannelRefusals,
        log: ReplyLog,
        flush_interval: float = FLUSH_INTERVAL_SECONDS,
        answer_blocks: AnswerBlocks | None = None,
    ) -> None:
        self._client = client
        self._answer_blocks = answer_blocks
        self._incoming = incoming
        self._channel = incoming.key.channel
        self._thread_ts = incoming.key.thread_ts
        self._mode: StreamMode = "native" if mode == "auto" else mode  # how new messages are written
        self._fallback = mode == "auto"
        self._refusals = refusals
        self._log = log
        self._flush_interval = flush_interval
        self._part = 0  # the current message's place among the job's messages
        self._text = ""  # the current Slack message's text, sent or not
        self._sent = 0  # how much of it Slack already shows
        self._ts: str | None = None  # the current Slack message, once written
        self._streaming = False  # the current message is a native stream (appendStream/stopStream)
        self._last_flush = float("-inf")
        self._status: asyncio.Task[None] | None = None
        self._recorded: asyncio.Task[None] | None = None  # the log's latest write, done or under way
        self._guard = OutputGuard()  # the model's text may try to notify a whole channel

    async def thinking(self, title: str | None = None) -> None:
        # Sent alongside the model request rather than before it; the first write waits for it, so the
        # status never lands after the text (Slack clears it when the answer is posted).
        self._status = asyncio.create_task(self._set_status(title))

    async def _set_status(self, title: str | None) -> None:
        # Only assistant threads take a title and a status; elsewhere Slack says no and the answer just
        # starts.
        if title:
            try:
                await self._client.assistant_threads_setTitle(
                    channel_id=self._channel, thread_ts=self._thread_ts, title=title
                )
            except _FAILURES as exc:
                log.debug("no thread title here: %s", type(exc).__name__)
        if self._channel in self._refusals.status:
            return
        try:
            await self._client.assistant_threads_setStatus(
                channel_id=self._channel,
                thread_ts=self._thread_ts,
                status=THINKING_STATUS,
                loading_messages=list(LOADING_MESSAGES),
            )
        except _FAILURES as exc:
            log.debug("no thinking status here: %s", type(exc).__name__)
            if _refused(exc):
                self._refusals.status.add(self._channel)

    async def append(self, text: str) -> None:
        await self._add(self._guard.feed(text))

    async def _add(self, text: str) -> None:
        self._text += text
        while len(self._text) > SPLIT_AT:
            head, tail = split_message(self._text, SPLIT_AT, floor=self._sent)
            self._text = head
            await self._complete_message("more")
            self._next_message(tail)
        if time.monotonic() - self._last_flush >= self._flush_interval:
            await self._flush()

    async def finish(self, footnote: str | None = None, rated: Rated | None = None) -> None:
        await self._add(self._guard.flush())
        if footnote:
            await self._add(("\n\n" if self._text.strip() else "") + safe_output(footnote))
        blocks = self._answer_blocks(rated) if self._answer_blocks and rated else None
        await self._end("done", blocks)

    async def fail(self, message: str) -> None:
        await self._add(self._guard.flush())
        await self._add(("\n\n" if self._text.strip() else "") + safe_output(f":warning: {message}"))
        await self._end("failed")

    async def notice(self, text: str) -> None:
        self._text, self._sent = safe_output(text), 0
        if self._mode == "native":
            self._mode = "update"  # one short message, posted whole rather than streamed
        await self._end("notice")

    async def _end(self, state: str, blocks: list[dict[str, Any]] | None = None) -> None:
        await self._complete_message(state, blocks)
        if self._recorded is not None:
            await self._recorded  # a write that failed fails the attempt here
        # A retried job may need fewer messages than the attempt before it wrote.
        for ts in self._log.parts[self._part + 1 :]:
            try:
                await self._client.chat_delete(channel=self._channel, ts=ts)
            except _FAILURES as exc:
                log.info("could not delete a leftover message: %s", _slack_error("chat_delete", exc).error)

    def _next_message(self, text: str) -> None:
        self._part += 1
        self._text, self._sent, self._ts, self._streaming = text, 0, None, False

    def _metadata(self, state: str) -> dict[str, Any]:
        return reply_metadata(self._log.job_id, self._part, state)

    async def _flush(self) -> None:
        """Show what Slack does not show yet."""
        if self._mode == "off" or len(self._text) == self._sent:
            return
        if self._ts is None:
            await self._start("writing")
        elif self._streaming:
            await self._native("chat_appendStream", "writing", markdown_text=self._text[self._sent :])
        else:
            await self._update("writing")
        self._sent = len(self._text)
        self._last_flush = time.monotonic()

    async def _status_sent(self) -> None:
        if self._status is not None:
            await self._status

    async def _start(self, state: str, blocks: list[dict[str, Any]] | None = None) -> None:
        """Put the current message in Slack with all its text so far (and ``blocks``, unless it becomes
        a native stream): the message an earlier attempt wrote in this place, rewritten, or a new one."""
        await self._status_sent()
        if self._part < len(self._log.parts) and await self._rewrite(
            self._log.parts[self._part], state, blocks
        ):
            return
        found = None
        if self._log.attempt > 1 and self._part == len(self._log.parts):
            found = await self._find_part()  # written by an attempt that died before recording it
        if found is not None and await self._rewrite(found, state, blocks):
            self._record(found)
            return
        self._ts = await self._create(state, blocks)
        self._record(self._ts)

    def _record(self, ts: str) -> None:
        """Write the message's ts to the log beside the answer, not before its next words (a job that
        dies first finds its unrecorded messages by their metadata); in order, so that the log never
        holds a part without the ones before it."""
        self._recorded = asyncio.create_task(self._record_after(self._recorded, self._part, ts))

    async def _record_after(self, before: asyncio.Task[None] | None, part: int, ts: str) -> None:
        if before is not None:
            await before
        await self._log.record(part, ts)

    async def _rewrite(self, ts: str, state: str, blocks: list[dict[str, Any]] | None = None) -> bool:
        """Make an earlier attempt's message this one; False when it is gone or Slack refuses to edit it
        (then it is deleted, if Slack lets it, so that the thread does not show it beside the new one)."""
        try:
            await self._client.chat_update(
                channel=self._channel, ts=ts, metadata=self._metadata(state), **self._body(blocks)
            )
        except _FAILURES as exc:
            if _transient(exc):
                raise _slack_error("chat_update", exc) from exc
            error = _slack_error("chat_update", exc).error
            log.info("could not rewrite an earlier attempt's message (%s); replacing it", error)
            with contextlib.suppress(*_FAILURES):
                await self._client.chat_delete(channel=self._channel, ts=ts)
            return False
        self._ts, self._streaming = ts, False
        return True

    async def _create(self, state: str, blocks: list[dict[str, Any]] | None = None) -> str:
        if self._mode == "native":
            try:
                ts = await self._create_once(
                    "chat_startStream",
                    state,
                    thread_ts=self._thread_ts,
                    markdown_text=self._text,
                    recipient_team_id=self._incoming.key.team,
                    recipient_user_id=self._incoming.user_id,
                )
                self._streaming = True
                return ts
            except SlackApiError as exc:
                if not self._fallback:
                    raise _slack_error("chat_startStream", exc) from exc
                log.info(
                    "native streaming refused (%s); posting and updating instead", exc.response.get("error")
                )
                self._refusals.streaming.add(self._channel)
                self._mode = "update"
        try:
            return await self._create_once(
                "chat_postMessage", state, thread_ts=self._thread_ts, **self._body(blocks)
            )
        except SlackApiError as exc:
            raise _slack_error("chat_postMessage", exc) from exc

    async def _create_once(self, method: str, state: str, **args: Any) -> str:
        """Create a message, retrying when Slack fails or cannot be reached, but never creating it twice:
        before each retry, look for the message the failed call may have created after all. A refusal
        (``ok: false``) is raised as ``SlackApiError`` for the caller to handle."""
        attempt = 1
        while True:
            try:
                response = await getattr(self._client, method)(
                    channel=self._channel, metadata=self._metadata(state), **args
                )
                return str(response["ts"])
            except _FAILURES as exc:
                if not _transient(exc):
                    raise
                if attempt == CREATE_ATTEMPTS:
                    raise _slack_error(method, exc) from exc
                log.info("%s failed (%s); retrying", method, type(exc).__name__)
            await asyncio.sleep(CREATE_BACKOFF_SECONDS * 2 ** (attempt - 1))
            if (found := await self._find_part()) is not None:
                return found
            attempt += 1

    async def _find_part(self) -> str | None:
        """The ts of the message this job wrote in the current place, found by its metadata."""
        cursor: str | None = None
        try:
            while True:
                page = await self._client.conversations_replies(
                    channel=self._channel,
                    ts=self._thread_ts,
                    oldest=self._incoming.ts,
                    include_all_metadata=True,
                    limit=200,
                    cursor=cursor,
                )
                for raw in page.get("messages") or []:
                    payload = (raw.get("metadata") or {}).get("event_payload") or {}
                    if payload.get("job") == self._log.job_id and payload.get("part") == self._part:
                        return str(raw["ts"])
                cursor = (page.get("response_metadata") or {}).get("next_cursor")
                if not page.get("has_more") or not cursor:
                    return None
        except _FAILURES as exc:
            raise _slack_error("conversations_replies", exc) from exc

    async def _complete_message(self, state: str, blocks: list[dict[str, Any]] | None = None) -> None:
        """Finish the current Slack message with all of its text, marked with ``state``, and ``blocks``
        (the feedback buttons) under it."""
        if not self._text.strip():
            return
        if self._ts is None:
            # Written whole, marked with its state; a native stream still has to be stopped.
            await self._start(state, blocks)
            self._sent = len(self._text)
        elif not self._streaming:
            await self._update(state, blocks)
        if self._streaming:
            rest = self._text[self._sent :] or None
            extra = {"blocks": blocks} if blocks else {}
            await self._native(
                "chat_stopStream", state, blocks, markdown_text=rest, metadata=self._metadata(state), **extra
            )
        self._sent = len(self._text)
        self._last_flush = time.monotonic()

    async def _update(self, state: str, blocks: list[dict[str, Any]] | None = None) -> None:
        await self._call("chat_update", ts=self._ts, metadata=self._metadata(state), **self._body(blocks))

    def _body(self, blocks: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The current message's text for a post or an edit, with ``blocks`` under it. markdown_text
        cannot go with blocks: the text then travels as a markdown block, and as the message's plain
        text (what notifications and thread reads show)."""
        if not blocks:
            return {"markdown_text": self._text}
        return {"text": self._text, "blocks": [{"type": "markdown", "text": self._text}, *blocks]}

    async def _native(
        self, method: str, state: str, blocks_if_broken: list[dict[str, Any]] | None = None, **args: Any
    ) -> None:
        """A native streaming call; if the stream broke server-side, show the full text (and
        ``blocks_if_broken``) with chat.update."""
        try:
            await getattr(self._client, method)(channel=self._channel, ts=self._ts, **args)
        except _FAILURES as exc:
            log.info("%s failed (%s); switching to chat.update", method, type(exc).__name__)
            self._streaming = False
            self._mode = "update"
            await self._update(state, blocks_if_broken)

    async def _call(self, method: str, **args: Any) -> Any:
        try:
            return await getattr(self._client, method)(channel=self._channel, **args)
        except _FAILURES as exc:
            raise _slack_error(method, exc) from exc


RESPONSE_URL_USES = 5  # Slack takes at most five answers through one response URL
CUT_PRIVATE = "_(The rest did not fit in the messages Slack lets me send you.)_"


class PrivateReply:
    """Writes what the bot says for one job only to the person who asked (implements
    ``domain.ReplyStream``): through their shortcut's response URL, which works where the bot is not a
    member. Slack cannot edit such a message, so the answer is sent whole once complete, split like any
    answer, in at most ``RESPONSE_URL_USES`` messages."""

    def __init__(self, adapter: SlackAdapter, response_url: str) -> None:
        self._adapter = adapter
        self._response_url = response_url
        self._text = ""

    async def thinking(self, title: str | None = None) -> None:
        pass  # nothing to show it on: the answer arrives whole

    async def append(self, text: str) -> None:
        self._text += text

    async def finish(self, footnote: str | None = None, rated: Rated | None = None) -> None:
        await self._send(self._text, footnote)

    async def fail(self, message: str) -> None:
        await self._send(self._text, f":warning: {message}")

    async def notice(self, text: str) -> None:
        await self._send(text, None)

    async def _send(self, text: str, footnote: str | None) -> None:
        if footnote:
            text += ("\n\n" if text.strip() else "") + footnote
        parts: list[str] = []
        while text and len(parts) < RESPONSE_URL_USES:
            head, text = split_message(text, SPLIT_AT - len(CUT_PRIVATE) - 2)
            parts.append(head)
        if text:
            parts[-1] += f"\n\n{CUT_PRIVATE}"
        for part in parts:
            await self._adapter.respond(self._response_url, part, markdown=True)


class SlackAdapter:
    """Implements ``domain.SlackPort`` with one ``AsyncWebClient``."""

    def __init__(
        self,
        client: AsyncWebClient,
        names: NameCache,
        *,
        bot_user_id: str,
        bot_id: str,
        stream_mode: StreamMode = "auto",
        answer_blocks: AnswerBlocks | None = None,
    ) -> None:
        self._client = client
        self._names = names
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self._stream_mode = stream_mode
        self._answer_blocks = answer_blocks
        # Channels where Slack refused native streaming: later replies there go straight to post+update.
        self._refusals = ChannelRefusals()
        self._recent_names: TTLCache[tuple[str, str], str] = TTLCache(maxsize=10_000, ttl=NAME_SECONDS)

    async def display_name(self, team: str, user_id: str) -> str:
        # Every reply names its asker: a copy in the process spares the Redis cache's round trip.
        recent = self._recent_names.get((team, user_id))
        if recent is not None:
            return recent
        cached = await self._names.cached_name(team, user_id)
        if cached:
            self._recent_names[(team, user_id)] = cached
            return cached
        try:
            response = await self._client.users_info(user=user_id)
        except _FAILURES as exc:
            log.info("users.info failed for a user: %s", _slack_error("users_info", exc).error)
            return user_id
        user = response["user"]
        profile = user.get("profile") or {}
        name = (
            profile.get("display_name")
            or profile.get("real_name")
            or user.get("real_name")
            or user.get("name")
        )
        name = valid_text(str(name or user_id))
        await self._names.cache_name(team, user_id, name)
        self._recent_names[(team, user_id)] = name
        return name

    async def readable(self, team: str, text: str) -> str:
        users = mentioned_users(text) - {self.bot_user_id}
        names = {user: await self.display_name(team, user) for user in users}
        return readable_markup(text, names, self.bot_user_id)

    async def thread_messages(self, key: ThreadKey) -> list[SlackMessage]:
        """What was said in a thread: people's and other bots' messages, and the bot's own finished
        answers (one message per answer, however many Slack messages it took); never a partial answer,
        an error or a notice of the bot's."""
        raws, cursor = await self._replies(key, pages=1)
        parent = raws[0] if raws and raws[0].get("ts") == key.thread_ts else {}
        replies = _whole_number(parent.get("reply_count"))
        if cursor and replies > len(raws) + NEWEST_READ:
            raws += await self._newest_replies(key, raws, replies)
        elif cursor:
            raws += (await self._replies(key, cursor=cursor))[0]
        answered = {
            payload.get("job") for payload in map(self._reply_payload, raws) if payload.get("state") == "done"
        }
        names = await self._speaker_names(key.team, raws)
        messages: list[SlackMessage] = []
        previous_job = None
        for raw in raws:
            job = None
            if self._is_mine(raw):
                payload = self._reply_payload(raw)
                job = payload.get("job")
                if job not in answered or payload.get("state") not in ANSWER_STATES:
                    continue
            message = self._thread_message(raw, names)
            if not message.text:
                continue
            if job is not None and job == previous_job:  # the next Slack message of the same answer
                last = messages.pop()
                message = dataclasses.replace(last, text=f"{last.text}\n{message.text}")
            messages.append(message)
            previous_job = job
        return messages

    async def _replies(
        self, key: ThreadKey, *, after: str = "", cursor: str | None = None, pages: int | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The thread's readable messages after the ts ``after`` (from the start when empty) or from
        ``cursor``, oldest first, over at most ``pages`` pages; and the cursor of the rest (None: no more)."""
        raws: list[dict[str, Any]] = []
        read = 0
        while pages is None or read < pages:
            try:
                page = await self._client.conversations_replies(
                    channel=key.channel,
                    ts=key.thread_ts,
                    limit=REPLIES_PAGE,
                    cursor=cursor,
                    oldest=after or None,
                    include_all_metadata=True,
                )
            except _FAILURES as exc:
                raise _slack_error("conversations_replies", exc) from exc
            read += 1
            for raw in page.get("messages") or []:
                if raw.get("subtype") not in _READABLE_SUBTYPES:
                    continue
                if after and raw.get("ts") == key.thread_ts:
                    continue  # Slack may send the parent with any window: it is kept from the first page
                raws.append(raw)
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                return raws, None
        return raws, cursor

    async def _newest_replies(
        self, key: ThreadKey, first_page: list[dict[str, Any]], replies: int
    ) -> list[dict[str, Any]]:
        """At least the newest ``NEWEST_READ`` replies of a long thread whose first page was read, the ones
        in between left unread: a context never holds thousands of messages, and reading them all would
        make the first answer in such a thread wait for every page. Slack reads a thread oldest first, so
        the window is guessed from the times of the replies (as if they came at an even pace), and
        widened until it holds enough."""
        first_end = _ts_value(first_page[-1].get("ts"))
        latest = _ts_value(first_page[0].get("latest_reply"))
        # A quarter more than the even pace needs, so that one window is mostly enough.
        share = min(
            Decimal(1), Decimal(NEWEST_READ) / Decimal(max(1, replies - len(first_page))) * Decimal("1.25")
        )
        while True:
            oldest = max(first_end, latest - (latest - first_end) * share)
            window, _ = await self._replies(key, after=f"{oldest:.6f}")
            if len(window) >= NEWEST_READ or oldest <= first_end or latest <= first_end:
                log.info(
                    "a thread of %d replies: read the first %d and the newest %d",
                    replies,
                    len(first_page),
                    len(window),
                )
                return window
            share = min(Decimal(1), share * 4)

    def _is_mine(self, raw: Mapping[str, Any]) -> bool:
        return raw.get("user") == self.bot_user_id or raw.get("bot_id") == self.bot_id

    @staticmethod
    def _reply_payload(raw: Mapping[str, Any]) -> Mapping[str, Any]:
        metadata = raw.get("metadata") or {}
        return (metadata.get("event_payload") or {}) if metadata.get("event_type") == REPLY_EVENT else {}

    def _thread_message(self, raw: Mapping[str, Any], names: Mapping[str, str]) -> SlackMessage:
        text = readable_markup(valid_text(str(raw.get("text") or "")), names, self.bot_user_id)
        ts = str(raw.get("ts", ""))
        user = raw.get("user")
        if self._is_mine(raw):
            return SlackMessage(ts, "assistant", self.bot_user_id, "", text)
        files = _message_files(raw)
        if user:
            return SlackMessage(ts, "user", user, names.get(user, user), text, files)
        bot_name = raw.get("username") or (raw.get("bot_profile") or {}).get("name") or "a bot"
        return SlackMessage(ts, "user", str(raw.get("bot_id", "")), valid_text(str(bot_name)), text, files)

    async def download(self, file: SlackFile, *, max_bytes: int, timeout_seconds: float) -> bytes:
        """A file's bytes, fetched with the bot token (``files:read``), following Slack's redirects but
        only to Slack's own hosts (the token goes nowhere else), at most ``max_bytes``. A failure is a
        ``SlackError``: "too_large", "not_slack" (a URL off Slack's hosts), "refused" (Slack answered
        with its sign-in page), "HTTP <status>", or why Slack could not be reached. URLs are never
        logged."""
        session = self._client.session
        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self._download(own, file, max_bytes, timeout_seconds)
        return await self._download(session, file, max_bytes, timeout_seconds)

    async def _download(
        self, session: aiohttp.ClientSession, file: SlackFile, max_bytes: int, timeout_seconds: float
    ) -> bytes:
        headers = {"Authorization": f"Bearer {self._client.token}"}
        try:
            async with asyncio.timeout(timeout_seconds):
                url = file.url or await self._file_url(file.id)
                for _ in range(MAX_REDIRECTS + 1):
                    if not self._slack_host(url):
                        raise SlackError("files.download", "not_slack")
                    async with session.get(url, headers=headers, allow_redirects=False) as response:
                        if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                            url = urljoin(url, response.headers["Location"])
                            continue
                        return await _read_download(response, file, max_bytes)
                raise SlackError("files.download", "too many redirects")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _slack_error("files_download", exc) from exc

    async def _file_url(self, file_id: str) -> str:
        """Where a file an event named only by its id can be downloaded (``files.info``)."""
        info = await _api(self._client, "files_info", file=file_id)
        try:
            return _File.model_validate(info.get("file") or {}).value().url
        except ValidationError as exc:
            raise SlackError("files.info", "malformed file") from exc

    def _slack_host(self, url: str) -> bool:
        """True for a URL of Slack's own file hosts (or of SLACK_API_URL's host: a proxy, or a test)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host == urlsplit(self._client.base_url).hostname:
            return parts.scheme in ("http", "https")
        return parts.scheme == "https" and (host in _FILE_HOSTS or host.endswith(_FILE_HOST_SUFFIXES))

    def reply_stream(self, incoming: Incoming, log: ReplyLog) -> SlackReplyStream:
        mode = self._stream_mode
        if mode == "auto" and incoming.key.channel in self._refusals.streaming:
            mode = "update"
        return SlackReplyStream(
            self._client, incoming, mode, self._refusals, log, answer_blocks=self._answer_blocks
        )

    def private_reply(self, response_url: str) -> PrivateReply:
        return PrivateReply(self, response_url)

    async def user_language(self, user_id: str) -> str:
        try:
            response = await self._client.users_info(user=user_id, include_locale=True)
        except _FAILURES as exc:
            log.info("users.info failed for a locale: %s", _slack_error("users_info", exc).error)
            return DEFAULT_LANGUAGE
        return language_of(str((response.get("user") or {}).get("locale") or ""))

    # What commands, the persona editor and App Home say and ask. Everything said is ``safe_output``.

    async def respond(self, response_url: str, text: str, *, markdown: bool = False) -> None:
        """An answer only the person who used a command or shortcut sees. It goes to the request's own
        ``response_url``, which works where the bot is not a member (private channels, DMs). With
        ``markdown``, the text is shown as Markdown (a model's answer) rather than Slack's mrkdwn."""
        webhook = AsyncWebhookClient(response_url, session=self._client.session, retry_handlers=_RETRIES)
        text = safe_output(text)
        blocks = [{"type": "markdown", "text": text}] if markdown else None
        try:
            response = await webhook.send(text=text, blocks=blocks, response_type="ephemeral")
        except _FAILURES as exc:
            raise _slack_error("response_url", exc) from exc
        if response.status_code != 200:
            raise SlackError(
                "response_url", f"HTTP {response.status_code}", transient=response.status_code >= 500
            )

    async def tell(self, user: str, channel: str, text: str) -> None:
        """An answer only ``user`` sees, where there is no ``response_url``: ephemeral in ``channel``,
        or, where the bot may not post there, in the bot's direct messages with them."""
        try:
            await self._client.chat_postEphemeral(channel=channel, user=user, text=safe_output(text))
        except _FAILURES as exc:
            error = _slack_error("chat_postEphemeral", exc).error
            log.info("no ephemeral answer possible here (%s); answering in a DM", error)
            await _api(self._client, "chat_postMessage", channel=user, text=safe_output(text))

    async def announce(self, channel: str, text: str) -> None:
        """One line everybody in ``channel`` sees."""
        await _api(self._client, "chat_postMessage", channel=channel, text=safe_output(text))

    async def _speaker_names(self, team: str, raws: list[dict[str, Any]]) -> dict[str, str]:
        """The display names of everyone who speaks or is mentioned in ``raws``: each looked up once per
        read, however often they spoke or were mentioned."""
        users = {r["user"] for r in raws if r.get("user")}.union(
            *(mentioned_users(r.get("text") or "") for r in raws)
        )
        return {user: await self.display_name(team, user) for user in users - {self.bot_user_id}}

    async def channel_messages(self, team: str, channel: str, limit: int) -> list[SlackMessage]:
        """The newest ``limit`` messages of a channel the bot is in, oldest first (one page of
        ``conversations.history``): people's and other bots', not the bot's own answers."""
        page = await _api(self._client, "conversations_history", channel=channel, limit=limit)
        raws = [
            r
            for r in page.get("messages") or []
            if r.get("subtype") in _READABLE_SUBTYPES and not self._is_mine(r)
        ]
        names = await self._speaker_names(team, raws)
        messages = [self._thread_message(raw, names) for raw in reversed(raws)]
        return [m for m in messages if m.text]

    async def greet_assistant_thread(
        self, channel: str, thread_ts: str, greeting: str, prompts: Sequence[str]
    ) -> None:
        """A new assistant-pane thread: the greeting in it, and the prompts the pane suggests."""
        await _api(
            self._client, "chat_postMessage", channel=channel, thread_ts=thread_ts, text=safe_output(greeting)
        )
        suggested = [{"title": safe_output(p)[:75], "message": safe_output(p)} for p in prompts]
        await _api(
            self._client,
            "assistant_threads_setSuggestedPrompts",
            channel_id=channel,
            thread_ts=thread_ts,
            title="Try asking",
            prompts=suggested,
        )

    async def open_view(self, trigger_id: str, view: Mapping[str, Any]) -> None:
        await _api(self._client, "views_open", trigger_id=trigger_id, view=view)

    async def publish_home(self, user: str, view: Mapping[str, Any]) -> None:
        await _api(self._client, "views_publish", user_id=user, view=view)

    async def is_member(self, channel: str, user: str) -> bool:
        """True when ``user`` is a member of ``channel``."""
        cursor = None
        while True:
            page = await _api(
                self._client, "conversations_members", channel=channel, cursor=cursor, limit=1000
            )
            if user in page.get("members", []):
                return True
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return False

    async def in_group(self, group: str, user: str) -> bool:
        """True when ``user`` belongs to the user group ``group``."""
        return user in (await _api(self._client, "usergroups_users_list", usergroup=group)).get("users", [])

    async def channel_name(self, channel: str) -> str:
        """A channel's name (``conversations.info``)."""
        return str((await _api(self._client, "conversations_info", channel=channel))["channel"]["name"])

    async def dm_channel(self, user: str) -> str:
        """The id of the bot's direct messages with ``user``."""
        return str((await _api(self._client, "conversations_open", users=user))["channel"]["id"])

    async def bot_channels(self) -> list[tuple[str, str]]:
        """(id, name) of the channels the bot is in (the first 200)."""
        page = await _api(
            self._client, "users_conversations", types="public_channel,private_channel", limit=200
        )
        channels: list[dict[str, Any]] = page.get("channels", [])
        return [(str(c["id"]), str(c.get("name") or c["id"])) for c in channels]


MAX_REDIRECTS = 5
_FILE_HOSTS = frozenset({"slack.com", "slack-files.com", "slack-edge.com", "slack-gov.com"})
_FILE_HOST_SUFFIXES = tuple(f".{host}" for host in _FILE_HOSTS)
# The bytes of these types are text in HTML's clothing; for anything else, an HTML answer is Slack's
# sign-in page, which it serves (with 200) when the token may not read the file.
_HTML_TYPES = frozenset({"html", "htm", "xhtml"})


async def _read_download(response: aiohttp.ClientResponse, file: SlackFile, max_bytes: int) -> bytes:
    if response.status != 200:
        raise SlackError("files.download", f"HTTP {response.status}", transient=response.status >= 500)
    if response.content_type == "text/html" and file.filetype not in _HTML_TYPES:
        raise SlackError("files.download", "refused")
    if (response.content_length or 0) > max_bytes:
        raise SlackError("files.download", "too_large")
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > max_bytes:
            raise SlackError("files.download", "too_large")
    return bytes(data)


def _message_files(raw: Mapping[str, Any]) -> tuple[SlackFile, ...]:
    """The readable files of a message read back from a thread (a malformed entry is skipped)."""
    files = []
    for item in raw.get("files") or []:
        try:
            file = _File.model_validate(item)
        except ValidationError:
            log.info("skipped a malformed file in a thread")
            continue
        if file.mode != "tombstone":
            files.append(file.value())
    return tuple(files)


async def _api(client: AsyncWebClient, method: str, **args: Any) -> AsyncSlackResponse:
    """One Web API call, its failure a ``SlackError``."""
    try:
        response: AsyncSlackResponse = await getattr(client, method)(**args)
    except _FAILURES as exc:
        raise _slack_error(method, exc) from exc
    return response


# Calls that create something: repeating one after a failure that may have taken effect could post twice,
# so the client never retries them on 5xx or connection errors (a 429 is safe: Slack did nothing).
# ``SlackReplyStream`` retries its own creations after checking that the failed one created nothing.
CREATES = frozenset({"chat.postMessage", "chat.startStream", "chat.appendStream", "chat.postEphemeral"})
WRITE_RETRIES = 3


def _method_of(request: HttpRequest) -> str:
    return request.url.rstrip("/").rsplit("/", 1)[-1]


class _SafeRetry(AsyncRetryHandler):
    """Retries a call that is safe to repeat when Slack answers with a 5xx or cannot be reached."""

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if _method_of(request) in CREATES:
            return False
        if response is not None:
            return response.status_code >= 500
        return isinstance(error, TimeoutError | aiohttp.ClientConnectionError)


class _CountingWebClient(AsyncWebClient):
    """Counts every failed call by method, for ``/metrics``."""

    async def api_call(self, api_method: str, **kwargs: Any) -> AsyncSlackResponse:
        try:
            return await super().api_call(api_method, **kwargs)
        except _FAILURES:
            SLACK_ERRORS.labels(api_method).inc()
            raise


_RETRIES: list[AsyncRetryHandler] = [
    AsyncRateLimitErrorRetryHandler(max_retry_count=WRITE_RETRIES),
    _SafeRetry(max_retry_count=WRITE_RETRIES),
]


class _OrjsonResponse(aiohttp.ClientResponse):
    """A response whose JSON body orjson decodes. slack_sdk calls ``json()`` without a decoder, and the
    standard library's takes twice as long (a 200-message ``conversations.replies`` page: 1.08 against
    0.54 ms on the bench's machine), once per page of every thread the bot reads."""

    async def json(
        self,
        *,
        encoding: str | None = None,
        loads: Callable[[str], Any] = orjson.loads,
        content_type: str | None = "application/json",
    ) -> Any:
        return await super().json(encoding=encoding, loads=loads, content_type=content_type)


def http_session() -> aiohttp.ClientSession:
    """The HTTP session every Slack call shares (without one, slack_sdk opens a connection per call).
    Slack's API sets no cookie the bot needs, so none is kept (the jar costs CPU on every call), and
    request and response bodies are encoded and decoded by orjson."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        json_serialize_bytes=orjson.dumps,
        response_class=_OrjsonResponse,
    )


def web_client(token: str, base_url: str, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """A Web API client whose calls survive rate limits (honouring ``Retry-After``), and 5xx and
    connection errors when repeating the call is safe; one shared HTTP ``session`` when given."""
    # slack_sdk formats a debug line of every request and response whenever its logger's own level is
    # unset (it tests ``logger.level``, not whether debug is on): give it the level it has in effect.
    sdk_log = logging.getLogger("slack_sdk.web.async_client")
    if sdk_log.level == logging.NOTSET:
        sdk_log.setLevel(sdk_log.getEffectiveLevel())
    return _CountingWebClient(
        token=token or None, base_url=base_url, session=session, retry_handlers=_RETRIES, logger=sdk_log
    )


async def check_app_token(client: AsyncWebClient, app_token: str) -> None:
    """Raise ``SlackError`` unless Slack accepts ``app_token`` for Socket Mode."""
    try:
        await client.apps_connections_open(app_token=app_token)
    except _FAILURES as exc:
        raise _slack_error("apps_connections_open", exc) from exc


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is in Slack, from ``auth.test``: its workspace, user and bot ids, granted scopes."""

    team_id: str
    user_id: str
    bot_id: str
    scopes: frozenset[str]


async def fetch_identity(client: AsyncWebClient) -> BotIdentity:
    """The bot's own ids and its granted scopes (``auth.test``)."""
    try:
        response = await client.auth_test()
    except _FAILURES as exc:
        raise _slack_error("auth_test", exc) from exc
    scopes = str(response.headers.get("x-oauth-scopes", ""))
    return BotIdentity(
        team_id=str(response.get("team_id", "")),
        user_id=str(response.get("user_id", "")),
        bot_id=str(response.get("bot_id", "")),
        scopes=frozenset(s.strip() for s in scopes.split(",") if s.strip()),
    )
