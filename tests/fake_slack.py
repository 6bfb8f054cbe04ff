"""A fake Slack for tests that drive the real ``slack_sdk`` / ``slack_bolt`` clients over loopback.

FakeSlack owns a small aiohttp server on 127.0.0.1 (random free port) that speaks just enough of Slack's
Web API (``/api/<method>``: auth, chat posting/updating/streaming, thread history, users, views, files),
of its file hosting (private URLs that need the bot token, one kind behind a redirect), and of
the Socket Mode WebSocket (``/socket``: hello, ``events_api`` envelopes, acks) for
``AsyncWebClient(base_url=fake.api_url)`` and bolt's ``AsyncSocketModeHandler`` to run unmodified. It
records every Web API call, keeps an in-memory message store per channel (seeded with ``add_message``,
written by the bot's posts and streams, with their message metadata) and lets a test inject per-method
errors: Slack's own ``ok: false`` answers via ``fail``, HTTP failures (500, 429 with ``Retry-After``, with
or without the call having taken effect) via ``fail_http``. Envelopes the app did not acknowledge can be
delivered again, as Slack does, with ``redeliver_unacked``. It owns nothing else: no client objects are
patched or mocked.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from bot.slack import REQUIRED_SCOPES

TEAM_ID = "T0001"
BOT_USER_ID = "UBOT"
BOT_ID = "BBOT"
APP_ID = "A0001"

Handler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class Call:
    """One Web API request as the fake received it."""

    method: str  # e.g. "chat.postMessage"
    args: dict[str, Any]  # query params + form fields (str) + JSON body (as parsed), merged
    at: float  # time.monotonic() when received
    token: str | None  # bearer token from the Authorization header


class SlackError(Exception):
    """Raised by a method handler to answer ``{"ok": false, "error": <str(self)>}``."""


def _user(uid: str, name: str, real_name: str, *, is_bot: bool = False) -> dict[str, Any]:
    profile = {"display_name": name, "real_name": real_name, "display_name_normalized": name}
    user = {"id": uid, "team_id": TEAM_ID, "name": name, "real_name": real_name, "is_bot": is_bot}
    return {**user, "deleted": False, "tz": "Europe/London", "locale": "en-GB", "profile": profile}


def _require(args: dict[str, Any], *names: str) -> dict[str, Any]:
    if not all(args.get(name) for name in names):
        raise SlackError("invalid_arguments")
    return {}


def _suggested_prompts(args: dict[str, Any]) -> dict[str, Any]:
    """As Slack checks them: one to four prompts, each with a title and a message."""
    prompts = args.get("prompts")
    _require(args, "channel_id", "thread_ts")
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= 4:
        raise SlackError("invalid_arguments")
    if not all(isinstance(p, dict) and p.get("title") and p.get("message") for p in prompts):
        raise SlackError("invalid_arguments")
    return {}


def _check_message_args(args: dict[str, Any]) -> None:
    """As Slack does: ``markdown_text`` goes with neither ``text`` nor ``blocks``; blocks well formed."""
    if args.get("markdown_text") and (args.get("text") or args.get("blocks")):
        raise SlackError("invalid_arguments")
    _check_blocks(args.get("blocks"))


def _check_blocks(blocks: Any) -> None:
    """The blocks the bot uses, checked as Slack checks them (``invalid_blocks`` otherwise): markdown
    (at most 12,000 characters), and context_actions holding feedback_buttons with both buttons."""
    for block in blocks or []:
        kind = block.get("type")
        if kind == "markdown":
            ok = isinstance(block.get("text"), str) and 0 < len(block["text"]) <= 12_000
        elif kind == "context_actions":
            ok = bool(block.get("elements")) and all(_good_feedback(e) for e in block["elements"])
        else:
            ok = kind in ("section", "header", "context", "divider", "actions", "input")
        if not ok:
            raise SlackError("invalid_blocks")


def _good_feedback(element: dict[str, Any]) -> bool:
    def good(button: Any) -> bool:
        text = (button or {}).get("text") or {}
        value = (button or {}).get("value")
        return (
            text.get("type") == "plain_text"
            and bool(text.get("text"))
            and isinstance(value, str)
            and len(value) <= 2000
        )

    return (
        element.get("type") == "feedback_buttons"
        and bool(element.get("action_id"))
        and good(element.get("positive_button"))
        and good(element.get("negative_button"))
    )


def _set_metadata(msg: dict[str, Any], args: dict[str, Any]) -> None:
    """Keep a message's metadata as Slack does: set by the call that carries it, else unchanged."""
    metadata = args.get("metadata")
    if isinstance(metadata, str):  # form-encoded callers send JSON strings
        metadata = json.loads(metadata)
    if isinstance(metadata, dict):
        msg["metadata"] = metadata


def _chunk_text(chunks: Any) -> str:
    if isinstance(chunks, str):  # form-encoded callers send JSON strings
        chunks = json.loads(chunks)
    if not isinstance(chunks, list):
        return ""
    return "".join(
        c.get("text", "") for c in chunks if isinstance(c, dict) and c.get("type") == "markdown_text"
    )


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.users: dict[str, dict[str, Any]] = {
            "U1": _user("U1", "alice", "Alice Liddell"),
            "U2": _user("U2", "bob", "Bob Builder"),
            BOT_USER_ID: _user(BOT_USER_ID, "bot", "Bot", is_bot=True),
        }
        self.users[BOT_USER_ID]["profile"]["bot_id"] = BOT_ID
        self.fail: dict[str, str] = {}
        self._http_failures: dict[str, deque[tuple[int, bool]]] = {}  # method -> (status, after processing)
        self.delay: dict[str, float] = {}  # method -> seconds to wait before answering
        self.scopes: list[str] = list(REQUIRED_SCOPES)  # granted to the bot token (x-oauth-scopes)
        self.call_listeners: list[Callable[[Call], None]] = []  # told of every call as it arrives
        self.acks: dict[str, float] = {}
        self.ack_payloads: dict[str, dict[str, Any]] = {}  # envelope_id -> the payload sent with the ack
        self.members: dict[str, list[str]] = {}  # channel -> member ids (conversations.members)
        self._responders: dict[str, str] = {}  # a command's response_url id -> who used the command
        self.usergroups: dict[str, list[str]] = {}  # usergroup id -> member ids
        self.channel_names: dict[str, str] = {}  # conversations.info: channel id -> name
        self.bot_channels: list[dict[str, Any]] = []  # users.conversations: the channels the bot is in
        self._messages: dict[str, dict[str, dict[str, Any]]] = {}  # channel -> ts -> message
        # (channel, thread ts) -> its replies' (ts as a number, ts), sorted: built when read, dropped when
        # the channel gains or loses a message, so a page costs the same however long the thread.
        self._reply_order: dict[tuple[str, str], list[tuple[Decimal, str]]] = {}
        self._streaming: dict[tuple[str, str], bool] = {}  # (channel, ts) -> still streaming?
        self._last_ts_us = 1_700_000_000_000_000
        self._sent: dict[str, float] = {}  # envelope_id -> monotonic send time
        self._envelopes: dict[str, dict[str, Any]] = {}  # envelope_id -> the envelope sent
        self._sockets: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        self.bot_token = "xoxb-test"  # the only token that may download files
        self.files: dict[str, dict[str, Any]] = {}  # file id -> its Slack file object (files.info)
        self._file_bytes: dict[str, bytes] = {}
        self._handlers: dict[str, Handler] = {
            "auth.test": self._auth_test,
            "bots.info": self._bots_info,
            "apps.connections.open": lambda _: {"url": f"ws://127.0.0.1:{self._port}/socket"},
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.startStream": self._start_stream,
            "chat.appendStream": self._append_stream,
            "chat.stopStream": lambda args: self._append_stream(args, stop=True),
            "assistant.threads.setStatus": lambda _: {},
            "assistant.threads.setTitle": lambda args: _require(args, "channel_id", "thread_ts", "title"),
            "assistant.threads.setSuggestedPrompts": _suggested_prompts,
            "conversations.replies": self._replies,
            "conversations.history": self._history,
            "users.info": self._users_info,
            "chat.postEphemeral": lambda _: {"message_ts": self.next_ts()},
            "conversations.members": lambda args: {
                "members": self.members.get(args.get("channel", ""), []),
                "response_metadata": {"next_cursor": ""},
            },
            "conversations.open": lambda args: {
                "channel": {"id": "D" + str(args.get("users", "")).lstrip("U")}
            },
            "usergroups.users.list": lambda args: {
                "users": self.usergroups.get(args.get("usergroup", ""), [])
            },
            "users.conversations": lambda _: {
                "channels": self.bot_channels,
                "response_metadata": {"next_cursor": ""},
            },
            "conversations.info": self._conversation_info,
            "chat.delete": self._delete,
            "files.info": self._files_info,
            "views.open": self._view,
            "views.update": self._view,
            "views.publish": self._view,
        }

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{id}", self._response)
        app.router.add_get("/socket", self._socket)
        app.router.add_get("/files-pri/{file_id}/{name}", self._download)
        app.router.add_get("/redirect/{file_id}", self._redirect)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/"

    # ---- inspection and seeding ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a Socket Mode client is connected."""
        return bool(self._sockets)

    def all_acked(self) -> bool:
        """True when the app acknowledged every envelope sent to it."""
        return all(envelope_id in self.acks for envelope_id in self._envelopes)

    def sent_at(self, envelope_id: str) -> float:
        """When an envelope left the fake (time.monotonic())."""
        return self._sent[envelope_id]

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def fail_http(self, method: str, status: int, *, times: int = 1, after_processing: bool = False) -> None:
        """Answer the next ``times`` calls of ``method`` with HTTP ``status`` (429 comes with
        ``Retry-After: 0``; 0 drops the connection instead of answering); ``after_processing``: do what
        the call asks first, as a server that fails while answering would."""
        self._http_failures.setdefault(method, deque()).extend([(status, after_processing)] * times)

    def add_file(
        self,
        name: str,
        content: bytes,
        mimetype: str,
        filetype: str,
        *,
        redirect: bool = False,
        size: int | None = None,
    ) -> dict[str, Any]:
        """A file people shared, served at its private URL only with the bot token (403 otherwise); its
        download URL answers with a redirect first when ``redirect``. Returns the file object events
        and ``files.info`` carry (``size`` may claim another size than the content has)."""
        file_id = f"F{uuid.uuid4().hex[:10].upper()}"
        base = f"http://127.0.0.1:{self._port}"
        url = f"{base}/files-pri/{file_id}/{name}"
        file = {
            "id": file_id,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": filetype,
            "size": len(content) if size is None else size,
            "mode": "hosted",
            "url_private": url,
            "url_private_download": f"{base}/redirect/{file_id}" if redirect else url,
        }
        self.files[file_id] = file
        self._file_bytes[file_id] = content
        return dict(file)

    def delete_file(self, file_id: str) -> None:
        """The file is deleted in Slack: its URLs answer 404 from now on."""
        self.files.pop(file_id, None)
        self._file_bytes.pop(file_id, None)

    def downloads(self) -> list[Call]:
        """Every request for a file's bytes (recorded as calls named "files.download")."""
        return self.calls_to("files.download")

    def bot_messages(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        """The bot's messages in a thread, oldest first, with their metadata."""
        return [m for m in self.thread(channel, thread_ts) if m.get("user") == BOT_USER_ID]

    def add_message(
        self,
        channel: str,
        *,
        ts: str,
        user: str | None,
        text: str,
        thread_ts: str | None = None,
        bot_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> None:
        msg: dict[str, Any] = {"type": "message", "ts": ts, "text": text}
        if metadata is not None:
            msg["metadata"] = metadata
        if files:
            msg.update(files=files, subtype="file_share", upload=False)
        if user is not None:
            msg["user"] = user
        if thread_ts is not None:
            msg["thread_ts"] = thread_ts
        if bot_id is not None:
            msg["bot_id"] = bot_id
            if user is None:
                msg["subtype"] = "bot_message"
        self._messages.setdefault(channel, {})[ts] = msg
        self._changed(channel)
        self._last_ts_us = max(self._last_ts_us, int(Decimal(ts) * 1_000_000))

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self._thread(channel, thread_ts))

    def _changed(self, channel: str) -> None:
        for key in [key for key in self._reply_order if key[0] == channel]:
            del self._reply_order[key]

    def _ordered_replies(self, channel: str, thread_ts: str) -> list[tuple[Decimal, str]]:
        key = (channel, thread_ts)
        if key not in self._reply_order:
            msgs = self._messages.get(channel, {}).values()
            self._reply_order[key] = sorted(
                (Decimal(m["ts"]), m["ts"])
                for m in msgs
                if m.get("thread_ts") == thread_ts and m["ts"] != thread_ts
            )
        return self._reply_order[key]

    def _thread(self, channel: str, thread_ts: str, oldest: Decimal | None = None) -> list[dict[str, Any]]:
        """The thread's messages, parent first, as stored (not copied: callers copy what they hand out);
        only those after ``oldest`` when given."""
        msgs = self._messages.get(channel, {})
        order = self._ordered_replies(channel, thread_ts)
        start = 0 if oldest is None else bisect.bisect_right(order, (oldest, "\uffff"))
        replies = [msgs[ts] for _, ts in order[start:]]
        parent = msgs.get(thread_ts)
        if oldest is not None and parent is not None and Decimal(thread_ts) <= oldest:
            parent = None
        if parent is None:
            return replies
        if order:
            parent = {
                **parent,
                "thread_ts": thread_ts,
                "reply_count": len(order),
                "latest_reply": order[-1][1],
            }
        return [parent, *replies]

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - a poll deadline, part of the helper API
        what: str = "",
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                seen = ", ".join(c.method for c in self.calls) or "none"
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or predicate!r}; calls: {seen}"
                )
            await asyncio.sleep(0.01)

    # ---- Socket Mode -----------------------------------------------------------------------------

    def event_callback(
        self, event: dict[str, Any], *, event_id: str, team_id: str = TEAM_ID
    ) -> dict[str, Any]:
        auth = {
            "enterprise_id": None,
            "team_id": team_id,
            "user_id": BOT_USER_ID,
            "is_bot": True,
            "is_enterprise_install": False,
        }
        return {
            "token": "verif",
            "team_id": team_id,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [auth],
            "is_ext_shared_channel": False,
            "event_context": f"4-{uuid.uuid4().hex}",
        }

    async def send_event(
        self, event: dict[str, Any], *, event_id: str | None = None, team_id: str = TEAM_ID
    ) -> str:
        event_id = event_id or f"Ev{uuid.uuid4().hex[:10].upper()}"
        return await self._send_envelope(
            "events_api", self.event_callback(event, event_id=event_id, team_id=team_id)
        )

    async def send_command(
        self, text: str, *, channel: str = "C1", user: str = "U1", command: str = "/persona"
    ) -> dict[str, Any]:
        """A slash command over Socket Mode; returns the payload the app acked it with."""
        payload = {
            "token": "verif",
            "team_id": TEAM_ID,
            "team_domain": "fake",
            "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "general",
            "user_id": user,
            "user_name": self.users.get(user, {}).get("name", user),
            "command": command,
            "text": text,
            "api_app_id": APP_ID,
            "response_url": self._response_url(user),
            "trigger_id": f"trigger-{uuid.uuid4().hex[:8]}",
        }
        envelope_id = await self._send_envelope("slash_commands", payload)
        await self.wait_ack(envelope_id)
        return self.ack_payloads[envelope_id]

    async def send_interaction(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A block action or view submission over Socket Mode; returns the ack payload."""
        payload = {"team": {"id": TEAM_ID, "domain": "fake"}, "api_app_id": APP_ID, **payload}
        payload.setdefault("trigger_id", f"trigger-{uuid.uuid4().hex[:8]}")
        envelope_id = await self._send_envelope("interactive", payload)
        await self.wait_ack(envelope_id)
        return self.ack_payloads[envelope_id]

    async def click_feedback(self, channel: str, ts: str, user: str, *, positive: bool) -> dict[str, Any]:
        """``user`` clicks the thumbs-up (``positive``) or thumbs-down under the bot's message ``ts``, as
        Slack shows it: the button must be there. Returns the ack payload."""
        msg = self._messages[channel][ts]
        [buttons] = [
            element
            for block in msg.get("blocks") or []
            if block.get("type") == "context_actions"
            for element in block["elements"]
            if element.get("type") == "feedback_buttons"
        ]
        button = buttons["positive_button" if positive else "negative_button"]
        container = {"type": "message", "message_ts": ts, "channel_id": channel, "is_ephemeral": False}
        if msg.get("thread_ts"):
            container["thread_ts"] = msg["thread_ts"]
        action = {"type": "feedback_buttons", "action_id": buttons["action_id"], "value": button["value"]}
        return await self.send_interaction(
            {
                "type": "block_actions",
                "user": {"id": user, "team_id": TEAM_ID},
                "container": container,
                "channel": {"id": channel},
                "message": dict(msg),
                "actions": [{**action, "block_id": "b1", "action_ts": self.next_ts()}],
            }
        )

    async def use_shortcut(self, callback_id: str, channel: str, ts: str, user: str) -> dict[str, Any]:
        """``user`` uses the message shortcut ``callback_id`` on the stored message ``ts``, as Slack sends
        it (a ``message_action`` with the message and a response URL); returns the ack payload."""
        message = copy.deepcopy(self._messages[channel][ts])
        message.pop("metadata", None)
        return await self.send_interaction(
            {
                "type": "message_action",
                "callback_id": callback_id,
                "user": {"id": user, "name": self.users.get(user, {}).get("name", user), "team_id": TEAM_ID},
                "channel": {"id": channel, "name": "general"},
                "message_ts": ts,
                "message": message,
                "response_url": self._response_url(user),
                "action_ts": self.next_ts(),
            }
        )

    async def submit_view(self, view: dict[str, Any], user: str, values: dict[str, Any]) -> dict[str, Any]:
        """``user`` submits the modal ``view`` (as the app opened it) with the inputs' ``values``
        (block id -> action id -> value); returns the ack payload."""
        return await self.send_interaction(
            {
                "type": "view_submission",
                "user": {"id": user, "team_id": TEAM_ID},
                "view": {
                    "type": "modal",
                    "id": f"V{uuid.uuid4().hex[:10].upper()}",
                    "callback_id": view["callback_id"],
                    "private_metadata": view.get("private_metadata", ""),
                    "state": {"values": values},
                },
            }
        )

    def response_url_for(self, user: str) -> str:
        """A response URL for a request of ``user``'s that a test sends itself."""
        return self._response_url(user)

    def _response_url(self, user: str) -> str:
        response_id = uuid.uuid4().hex[:12]
        self._responders[response_id] = user
        return f"http://127.0.0.1:{self._port}/response/{response_id}"

    def responses(self, user: str | None = None) -> list[str]:
        """The texts the app sent through commands' response_urls (to ``user``'s commands, if given)."""
        return [
            c.args.get("text", "") for c in self.calls_to("response_url") if user in (None, c.args["user"])
        ]

    async def _response(self, request: web.Request) -> web.Response:
        """A command's response_url: records what the app answered, as a call named "response_url"."""
        response_id = request.match_info["id"]
        body = await request.json()
        call = Call(
            "response_url", {**body, "user": self._responders.get(response_id, "")}, time.monotonic(), None
        )
        self.calls.append(call)
        for listener in self.call_listeners:
            listener(call)
        failures = self._http_failures.get("response_url")
        if failures:
            return self._http_failure(request, failures.popleft()[0])
        return web.Response(text="ok")

    async def wait_ack(self, envelope_id: str, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        await self.wait_for(lambda: envelope_id in self.acks, timeout, f"ack of envelope {envelope_id}")
        return self.acks[envelope_id] - self._sent[envelope_id]

    async def _send_envelope(self, type_: str, payload: dict[str, Any]) -> str:
        await self.wait_for(lambda: bool(self._sockets), 5.0, "a Socket Mode connection")
        envelope_id = str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "type": type_,
            "accepts_response_payload": False,
            "retry_attempt": 0,
            "retry_reason": "",
            "payload": payload,
        }
        self._sent[envelope_id] = time.monotonic()
        self._envelopes[envelope_id] = envelope
        await self._sockets[-1].send_str(json.dumps(envelope))
        return envelope_id

    async def redeliver_unacked(self) -> list[str]:
        """Send every envelope the app has not acknowledged again, as Slack retries them; the new ids."""
        resent = []
        for envelope_id, envelope in list(self._envelopes.items()):
            if envelope_id in self.acks:
                continue
            del self._envelopes[envelope_id]
            attempt = envelope["retry_attempt"] + 1
            new_id = await self._send_envelope(envelope["type"], envelope["payload"])
            self._envelopes[new_id].update(retry_attempt=attempt, retry_reason="timeout")
            resent.append(new_id)
        return resent

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        # autoping (the default) answers the SDK's "sdk-ping-pong:<t>" pings with matching pongs.
        ws = web.WebSocketResponse(timeout=1.0)
        await ws.prepare(request)
        self._sockets.append(ws)
        try:
            await ws.send_json(
                {
                    "type": "hello",
                    "num_connections": len(self._sockets),
                    "debug_info": {"host": "fake-slack", "approximate_connection_time": 3600},
                    "connection_info": {"app_id": APP_ID},
                }
            )
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    ack = json.loads(msg.data)
                    envelope_id = ack.get("envelope_id")
                    if isinstance(envelope_id, str):
                        self.acks[envelope_id] = time.monotonic()
                        self.ack_payloads[envelope_id] = ack.get("payload") or {}
        finally:
            self._sockets.remove(ws)
        return ws

    # ---- Web API ---------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query.items())
        if request.content_type == "application/json" and request.body_exists:
            body = await request.json()
            if isinstance(body, dict):
                args.update(body)
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            for key, value in (await request.post()).items():
                args[key] = value if isinstance(value, str) else getattr(value, "filename", str(value))
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else args.pop("token", None)
        call = Call(method=method, args=args, at=time.monotonic(), token=token)
        self.calls.append(call)
        for listener in self.call_listeners:
            listener(call)
        await asyncio.sleep(self.delay.get(method, 0.0))  # recorded on arrival, answered late
        handler = self._handlers.get(method)
        failures = self._http_failures.get(method)
        status, after_processing = failures.popleft() if failures else (200, False)
        if status != 200 and not after_processing:
            return self._http_failure(request, status)
        try:
            if method in self.fail:
                raise SlackError(self.fail[method])
            if handler is None:
                raise SlackError("unknown_method")
            answer = handler(args)
            if status != 200:
                return self._http_failure(request, status)
            scopes = {"x-oauth-scopes": ",".join(self.scopes)}
            return web.json_response({"ok": True, **answer}, headers=scopes)
        except SlackError as e:
            return web.json_response({"ok": False, "error": str(e)})

    @staticmethod
    def _http_failure(request: web.Request, status: int) -> web.Response:
        if status == 0 and request.transport is not None:
            request.transport.close()  # the client sees the connection drop, with no answer
        headers = {"Retry-After": "0"} if status == 429 else {}
        error = "ratelimited" if status == 429 else "internal_error"
        return web.json_response({"ok": False, "error": error}, status=status, headers=headers)

    def next_ts(self) -> str:
        self._last_ts_us += 100
        return f"{self._last_ts_us // 1_000_000}.{self._last_ts_us % 1_000_000:06d}"

    def _find(self, args: dict[str, Any]) -> dict[str, Any]:
        msg = self._messages.get(str(args.get("channel")), {}).get(str(args.get("ts")))
        if msg is None:
            raise SlackError("message_not_found")
        return msg

    def _bot_message(self, args: dict[str, Any], text: str) -> dict[str, Any]:
        channel = args.get("channel")
        if not channel:
            raise SlackError("channel_not_found")
        ts = self.next_ts()
        self.add_message(
            channel, ts=ts, user=BOT_USER_ID, text=text, thread_ts=args.get("thread_ts"), bot_id=BOT_ID
        )
        msg = self._messages[channel][ts]
        msg["app_id"] = APP_ID
        if "blocks" in args:
            msg["blocks"] = args["blocks"]
        _set_metadata(msg, args)
        return msg

    def _auth_test(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "user": "bot",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _bots_info(self, _: dict[str, Any]) -> dict[str, Any]:
        bot = {"id": BOT_ID, "deleted": False, "name": "bot", "app_id": APP_ID, "user_id": BOT_USER_ID}
        return {"bot": {**bot, "icons": {}}}

    def _post_message(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_message_args(args)
        msg = self._bot_message(args, args.get("markdown_text") or args.get("text") or "")
        return {"channel": args["channel"], "ts": msg["ts"], "message": dict(msg)}

    def _update(self, args: dict[str, Any]) -> dict[str, Any]:
        _check_message_args(args)
        msg = self._find(args)
        msg["text"] = args.get("markdown_text") or args.get("text") or ""
        if "blocks" in args:
            msg["blocks"] = args["blocks"]
        _set_metadata(msg, args)
        return {"channel": args["channel"], "ts": msg["ts"], "text": msg["text"], "message": dict(msg)}

    def _start_stream(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("thread_ts"):
            raise SlackError("invalid_arguments")
        msg = self._bot_message(args, (args.get("markdown_text") or "") + _chunk_text(args.get("chunks")))
        self._streaming[(args["channel"], msg["ts"])] = True
        return {"channel": args["channel"], "ts": msg["ts"]}

    def _append_stream(self, args: dict[str, Any], *, stop: bool = False) -> dict[str, Any]:
        msg = self._find(args)
        key = (args["channel"], msg["ts"])
        if not self._streaming.get(key):
            raise SlackError("message_not_in_streaming_state")
        msg["text"] += (args.get("markdown_text") or "") + _chunk_text(args.get("chunks"))
        _check_blocks(args.get("blocks"))
        if "blocks" in args:
            msg["blocks"] = args["blocks"]
        _set_metadata(msg, args)
        self._streaming[key] = not stop
        return {"channel": args["channel"], "ts": msg["ts"]}

    def _delete(self, args: dict[str, Any]) -> dict[str, Any]:
        msg = self._find(args)
        del self._messages[str(args["channel"])][msg["ts"]]
        self._changed(str(args["channel"]))
        return {"channel": args["channel"], "ts": msg["ts"]}

    def _replies(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, thread_ts = str(args.get("channel")), str(args.get("ts"))
        if thread_ts not in self._messages.get(channel, {}) and not self._ordered_replies(channel, thread_ts):
            raise SlackError("thread_not_found")
        messages = self._thread(
            channel, thread_ts, Decimal(str(args["oldest"])) if args.get("oldest") else None
        )
        limit = min(max(int(args.get("limit") or 100), 1), 1000)
        cursor = str(args.get("cursor") or "")
        if cursor and not (cursor.startswith("offset_") and cursor[7:].isdigit()):
            raise SlackError("invalid_cursor")
        start = int(cursor[7:]) if cursor else 0
        page, more = copy.deepcopy(messages[start : start + limit]), start + limit < len(messages)
        if str(args.get("include_all_metadata")).lower() not in ("true", "1"):
            for message in page:
                message.pop("metadata", None)
        next_cursor = f"offset_{start + limit}" if more else ""
        return {"messages": page, "has_more": more, "response_metadata": {"next_cursor": next_cursor}}

    def _history(self, args: dict[str, Any]) -> dict[str, Any]:
        """A channel's messages outside threads (and threads' parents), newest first; only in channels
        the bot is in (``bot_channels``), as Slack answers ``not_in_channel`` otherwise."""
        channel = str(args.get("channel"))
        if channel not in {c["id"] for c in self.bot_channels}:
            raise SlackError("not_in_channel")
        messages = [
            copy.deepcopy(m)
            for m in self._messages.get(channel, {}).values()
            if m.get("thread_ts") in (None, m["ts"])
        ]
        messages.sort(key=lambda m: Decimal(m["ts"]), reverse=True)
        limit = min(max(int(args.get("limit") or 100), 1), 1000)
        return {"messages": messages[:limit], "has_more": len(messages) > limit}

    def _conversation_info(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(args.get("channel"))
        if channel not in self.channel_names:
            raise SlackError("channel_not_found")
        return {"channel": {"id": channel, "name": self.channel_names[channel]}}

    def _files_info(self, args: dict[str, Any]) -> dict[str, Any]:
        file = self.files.get(str(args.get("file")))
        if file is None:
            raise SlackError("file_not_found")
        return {"file": dict(file)}

    def _record_download(self, request: web.Request, file_id: str) -> bool:
        """Record a file request as a call; True when it carries the bot token."""
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        call = Call("files.download", {"file": file_id, "path": request.path}, time.monotonic(), token)
        self.calls.append(call)
        for listener in self.call_listeners:
            listener(call)
        return token == self.bot_token

    async def _download(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if not self._record_download(request, file_id):
            return web.Response(status=403, text="forbidden")
        failures = self._http_failures.get("files.download")
        if failures:
            return self._http_failure(request, failures.popleft()[0])
        content = self._file_bytes.get(file_id)
        if content is None:
            return web.Response(status=404, text="not found")
        mimetype = self.files[file_id]["mimetype"] or "application/octet-stream"
        return web.Response(body=content, content_type=mimetype)

    async def _redirect(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        file = self.files.get(file_id)
        if not self._record_download(request, file_id) or file is None:
            return web.Response(status=403 if file else 404, text="no")
        raise web.HTTPFound(file["url_private"])

    def _users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = self.users.get(str(args.get("user")))
        if user is None:
            raise SlackError("user_not_found")
        user = copy.deepcopy(user)
        if str(args.get("include_locale")).lower() not in ("true", "1"):
            user.pop("locale", None)  # Slack tells a user's locale only when asked
        return {"user": user}

    def _view(self, args: dict[str, Any]) -> dict[str, Any]:
        view = args.get("view") or {}
        if isinstance(view, str):
            view = json.loads(view)
        view_id = args.get("view_id") or f"V{uuid.uuid4().hex[:10].upper()}"
        return {"view": {**view, "id": view_id, "team_id": TEAM_ID, "app_id": APP_ID, "bot_id": BOT_ID}}
