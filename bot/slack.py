"""Everything that knows Slack's JSON and Web API.

- ``parse_event``: a Bolt event payload -> ``Incoming`` (or None for anything the bot must not answer:
  its own and other bots' messages, edits, deletions and other subtypes, channel chatter).
- ``SlackAdapter``: implements ``domain.SlackPort``: markup made readable (user mentions as display
  names, cached in Redis), reading a thread with ``conversations.replies``, short posts, reply streams.
- ``SlackReplyStream``: one answer written into a thread while the model produces it: Slack's native
  streaming (``chat.startStream``/``appendStream``/``stopStream``) or, when Slack refuses it, one post
  edited with ``chat.update``; at most one write a second after the first, and a new message whenever
  the text outgrows one Slack message, split at a Markdown block boundary, never inside a code block.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

from markdown_it import MarkdownIt
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.domain import Incoming, SlackMessage, ThreadKey
from bot.errors import SlackError

log = logging.getLogger(__name__)

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
    "usergroups:read",
)

MESSAGE_LIMIT = 12_000  # Slack's limit for markdown_text
SPLIT_AT = MESSAGE_LIMIT - 100
FENCE_RESERVE = 8  # room to close a code fence at a cut
FLUSH_INTERVAL_SECONDS = 1.0
THINKING_STATUS = "is thinking…"
# Message subtypes that are still a person saying something new.
_ANSWERABLE_SUBTYPES = {None, "file_share", "thread_broadcast"}
# Messages worth remembering when reading a thread back: those, and other bots' posts.
_READABLE_SUBTYPES = _ANSWERABLE_SUBTYPES | {"bot_message"}
_MARKUP = re.compile(r"<([^<>]+)>")
_markdown = MarkdownIt("commonmark")


def parse_event(event: Mapping[str, Any], *, team: str, bot_user_id: str) -> Incoming | None:
    """The message in an ``app_mention`` or ``message`` event, if the bot may answer it."""
    if (
        event.get("type") not in ("app_mention", "message")
        or event.get("subtype") not in _ANSWERABLE_SUBTYPES
    ):
        return None
    user = event.get("user")
    if not user or user == bot_user_id or event.get("bot_id"):
        return None  # never answer itself or another bot
    channel, ts, text = event.get("channel"), event.get("ts"), event.get("text") or ""
    if not channel or not ts:
        return None
    thread_ts = event.get("thread_ts") or ts
    is_dm = event.get("channel_type") == "im" or str(channel).startswith("D")
    mentioned = event["type"] == "app_mention" or f"<@{bot_user_id}>" in text
    if not (mentioned or is_dm or thread_ts != ts):
        return None  # top-level channel chatter
    return Incoming(
        key=ThreadKey(team=team, channel=channel, thread_ts=thread_ts),
        ts=ts,
        user_id=user,
        text=text,
        addressed=mentioned or is_dm,
        is_dm=is_dm,
    )


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

    cleaned = _MARKUP.sub(replace, text)
    return html.unescape(re.sub(r"[ \t]{2,}", " ", cleaned)).strip()


def mentioned_users(text: str) -> set[str]:
    """User ids mentioned with ``<@U…>`` in Slack markup."""
    return {m.group(1).partition("|")[0][1:] for m in _MARKUP.finditer(text) if m.group(1).startswith("@")}


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


class SlackReplyStream:
    """Writes one answer into a thread as it is produced (implements ``domain.ReplyStream``)."""

    def __init__(
        self,
        client: AsyncWebClient,
        incoming: Incoming,
        mode: StreamMode,
        on_native_refused: Callable[[str], None],
        flush_interval: float = FLUSH_INTERVAL_SECONDS,
    ) -> None:
        self._client = client
        self._incoming = incoming
        self._channel = incoming.key.channel
        self._thread_ts = incoming.key.thread_ts
        self._mode: StreamMode = "native" if mode == "auto" else mode
        self._fallback = mode == "auto"
        self._on_native_refused = on_native_refused
        self._flush_interval = flush_interval
        self._text = ""  # the current Slack message's text, sent or not
        self._sent = 0  # how much of it Slack already shows
        self._ts: str | None = None  # the current Slack message, once posted
        self._last_flush = float("-inf")
        self._status: asyncio.Task[None] | None = None

    async def thinking(self) -> None:
        # Sent alongside the model request rather than before it; the first write waits for it, so the
        # status never lands after the text.
        self._status = asyncio.create_task(self._set_status())

    async def _set_status(self) -> None:
        try:
            await self._client.assistant_threads_setStatus(
                channel_id=self._channel, thread_ts=self._thread_ts, status=THINKING_STATUS
            )
        except SlackApiError as exc:
            # Only assistant threads accept a status; elsewhere Slack says no and the answer just starts.
            log.debug("no thinking status here: %s", exc.response.get("error"))

    async def append(self, text: str) -> None:
        self._text += text
        while len(self._text) > SPLIT_AT:
            head, tail = split_message(self._text, SPLIT_AT, floor=self._sent)
            self._text = head
            await self._complete_message()
            self._text, self._sent, self._ts = tail, 0, None
        if time.monotonic() - self._last_flush >= self._flush_interval:
            await self._flush()

    async def finish(self, footnote: str | None = None) -> None:
        if footnote:
            await self.append(("\n\n" if self._text.strip() else "") + footnote)
        await self._complete_message()

    async def fail(self, message: str) -> None:
        await self.finish(f":warning: {message}")

    async def _flush(self) -> None:
        """Show what Slack does not show yet."""
        if self._mode == "off" or len(self._text) == self._sent:
            return
        if self._ts is None:
            await self._start()
        elif self._mode == "native":
            await self._native("chat_appendStream", ts=self._ts, markdown_text=self._text[self._sent :])
        else:
            await self._call("chat_update", ts=self._ts, markdown_text=self._text)
        self._sent = len(self._text)
        self._last_flush = time.monotonic()

    async def _status_sent(self) -> None:
        if self._status is not None:
            await self._status

    async def _start(self) -> None:
        await self._status_sent()
        if self._mode == "native":
            try:
                response = await self._client.chat_startStream(
                    channel=self._channel,
                    thread_ts=self._thread_ts,
                    markdown_text=self._text,
                    recipient_team_id=self._incoming.key.team,
                    recipient_user_id=self._incoming.user_id,
                )
                self._ts = str(response["ts"])
                return
            except SlackApiError as exc:
                if not self._fallback:
                    raise SlackError("chat.startStream", str(exc.response.get("error"))) from exc
                log.info(
                    "native streaming refused (%s); posting and updating instead", exc.response.get("error")
                )
                self._on_native_refused(self._channel)
                self._mode = "update"
        response = await self._call("chat_postMessage", thread_ts=self._thread_ts, markdown_text=self._text)
        self._ts = str(response["ts"])

    async def _complete_message(self) -> None:
        """Finish the current Slack message with all of its text."""
        if not self._text.strip():
            return
        if self._mode == "off":
            await self._status_sent()
            await self._call("chat_postMessage", thread_ts=self._thread_ts, markdown_text=self._text)
        else:
            if self._ts is None:
                await self._start()  # shows all the text so far (and may fall back from native to update)
                self._sent = len(self._text)
            if self._mode == "native":
                await self._native(
                    "chat_stopStream", ts=self._ts, markdown_text=self._text[self._sent :] or None
                )
            elif self._sent < len(self._text):
                await self._call("chat_update", ts=self._ts, markdown_text=self._text)
        self._sent = len(self._text)
        self._last_flush = time.monotonic()

    async def _native(self, method: str, **args: Any) -> None:
        """A native streaming call; if the stream broke server-side, show the full text with chat.update."""
        try:
            await getattr(self._client, method)(channel=self._channel, **args)
        except SlackApiError as exc:
            log.info("%s failed (%s); switching to chat.update", method, exc.response.get("error"))
            self._mode = "update"
            await self._call("chat_update", ts=self._ts, markdown_text=self._text)

    async def _call(self, method: str, **args: Any) -> Any:
        try:
            return await getattr(self._client, method)(channel=self._channel, **args)
        except SlackApiError as exc:
            raise SlackError(method.replace("_", "."), str(exc.response.get("error"))) from exc


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
    ) -> None:
        self._client = client
        self._names = names
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self._stream_mode = stream_mode
        # Channels where Slack refused native streaming: later replies there go straight to post+update.
        self._native_refused: set[str] = set()

    async def display_name(self, team: str, user_id: str) -> str:
        cached = await self._names.cached_name(team, user_id)
        if cached:
            return cached
        try:
            response = await self._client.users_info(user=user_id)
        except SlackApiError as exc:
            log.info("users.info failed for a user: %s", exc.response.get("error"))
            return user_id
        user = response["user"]
        profile = user.get("profile") or {}
        name = (
            profile.get("display_name")
            or profile.get("real_name")
            or user.get("real_name")
            or user.get("name")
        )
        name = str(name or user_id)
        await self._names.cache_name(team, user_id, name)
        return name

    async def readable(self, team: str, text: str) -> str:
        users = mentioned_users(text) - {self.bot_user_id}
        names = {user: await self.display_name(team, user) for user in users}
        return readable_markup(text, names, self.bot_user_id)

    async def thread_messages(self, key: ThreadKey) -> list[SlackMessage]:
        raws: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            try:
                page = await self._client.conversations_replies(
                    channel=key.channel, ts=key.thread_ts, limit=200, cursor=cursor
                )
            except SlackApiError as exc:
                raise SlackError("conversations.replies", str(exc.response.get("error"))) from exc
            raws += [r for r in page.get("messages") or [] if r.get("subtype") in _READABLE_SUBTYPES]
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                break
        # Each person's name is looked up once per read, however often they spoke or were mentioned.
        users = {r["user"] for r in raws if r.get("user")}.union(
            *(mentioned_users(r.get("text") or "") for r in raws)
        )
        names = {user: await self.display_name(key.team, user) for user in users - {self.bot_user_id}}
        messages = [self._thread_message(raw, names) for raw in raws]
        return [m for m in messages if m.text]

    def _thread_message(self, raw: Mapping[str, Any], names: Mapping[str, str]) -> SlackMessage:
        text = readable_markup(raw.get("text") or "", names, self.bot_user_id)
        ts = str(raw.get("ts", ""))
        user = raw.get("user")
        if user == self.bot_user_id or raw.get("bot_id") == self.bot_id:
            return SlackMessage(ts, "assistant", self.bot_user_id, "", text)
        if user:
            return SlackMessage(ts, "user", user, names.get(user, user), text)
        bot_name = raw.get("username") or (raw.get("bot_profile") or {}).get("name") or "a bot"
        return SlackMessage(ts, "user", str(raw.get("bot_id", "")), str(bot_name), text)

    def reply_stream(self, incoming: Incoming) -> SlackReplyStream:
        mode = self._stream_mode
        if mode == "auto" and incoming.key.channel in self._native_refused:
            mode = "update"
        return SlackReplyStream(self._client, incoming, mode, self._native_refused.add)

    async def post(self, incoming: Incoming, text: str) -> None:
        try:
            await self._client.chat_postMessage(
                channel=incoming.key.channel, thread_ts=incoming.key.thread_ts, markdown_text=text
            )
        except SlackApiError as exc:
            raise SlackError("chat.postMessage", str(exc.response.get("error"))) from exc


async def check_app_token(client: AsyncWebClient, app_token: str) -> None:
    """Raise ``SlackError`` unless Slack accepts ``app_token`` for Socket Mode."""
    try:
        await client.apps_connections_open(app_token=app_token)
    except SlackApiError as exc:
        raise SlackError("apps.connections.open", str(exc.response.get("error"))) from exc


async def fetch_identity(client: AsyncWebClient) -> dict[str, str]:
    """The bot's own ids from ``auth.test`` (team_id, user_id, bot_id) and its granted ``scopes``."""
    try:
        response = await client.auth_test()
    except SlackApiError as exc:
        raise SlackError("auth.test", str(exc.response.get("error"))) from exc
    identity = {k: str(response.get(k, "")) for k in ("team_id", "user_id", "bot_id")}
    identity["scopes"] = str(response.headers.get("x-oauth-scopes", ""))
    return identity
