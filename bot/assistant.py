"""Slack's assistant pane (Agents & AI Apps): what the bot says when someone opens a thread with it, and
which channel they are looking at.

A thread in the pane is a thread of the person's DM with the bot, so its questions take the same path as
any DM (the job queue, the DM persona, history, budgets, files, streaming); the first question titles
the thread, and the status line shows while the model works (``slack.SlackReplyStream.thinking``). This
module answers ``assistant_thread_started`` with a short greeting and up to four suggested prompts (the
persona's ``suggested_prompts``, else the settings', else the bot's own), remembers the channel the
person views beside the pane (``assistant_thread_started`` and ``assistant_thread_context_changed``),
and, for a question about "this channel", reads that channel's recent messages
(``conversations.history``, only where the bot is a member) within ``FILE_MAX_TOKENS``.

Bolt's ``Assistant`` middleware is not used: it would take the pane's messages into its own listeners,
and every question must be queued by the ingress before Slack is acknowledged.

Key (docs/architecture.md), built here only: ``{prefix}{T:D:TS}:viewing``, the channel the person views
beside pane thread TS of DM D; under the thread's tag, kept as long as the thread's history.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as redis

from bot.conversation import newest_that_fit
from bot.domain import ChannelExcerpt, ThreadKey, TokenCounter
from bot.errors import BotError, SlackError
from bot.personas import PersonaStore
from bot.redis_client import redis_errors
from bot.slack import AssistantThread, SlackAdapter, parse_assistant_thread

log = logging.getLogger(__name__)

GREETING = "Hi! Ask me anything, or share a file. I remember everything said in this thread."
DEFAULT_PROMPTS = (
    "Summarize a long text for me",
    "Help me write a clear reply",
    "Explain an error message",
    "Brainstorm ideas with me",
)
CHANNEL_MESSAGES_READ = 200  # one page of conversations.history: one call, well within its rate limit
# A question about the channel being viewed: "summarize this channel", "what's new in the channel?".
_ABOUT_THE_CHANNEL = re.compile(r"\b(this|the|current) channel\b", re.IGNORECASE)
_NOT_READABLE = {
    "not_in_channel": "I'm not in <#{c}>, so I can't read it: add me to it first",
    "channel_not_found": "I'm not in <#{c}>, so I can't read it: add me to it first",
}


class AssistantPane:
    """Greets new threads in the assistant pane, remembers the channel each one sits beside, and reads
    it for questions about it (implements ``domain.PaneContext``)."""

    def __init__(
        self,
        slack: SlackAdapter,
        personas: PersonaStore,
        client: redis.Redis,
        counter: TokenCounter,
        *,
        prefix: str,
        ttl_seconds: int,
        max_tokens: int,
        default_prompts: Sequence[str] | None,
    ) -> None:
        self._slack = slack
        self._personas = personas
        self._redis = client
        self._counter = counter
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._max_tokens = max_tokens
        self._default_prompts = tuple(default_prompts or DEFAULT_PROMPTS)

    def _viewing_key(self, key: ThreadKey) -> str:
        return f"{self._prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:viewing"

    async def thread_started(self, body: Mapping[str, Any]) -> None:
        """Answer one ``assistant_thread_started`` (already acknowledged)."""
        thread = parse_assistant_thread(body)
        if thread is None:
            return
        await self._remember_viewing(thread)
        try:
            # The DM's persona, not pinned: the thread's first question pins it.
            persona = (await self._personas.assignment(thread.team, thread.channel)).persona
        except BotError as exc:
            log.warning("no persona for a new assistant thread, offering the default prompts: %s", exc)
            prompts: Sequence[str] = self._default_prompts
        else:
            prompts = persona.suggested_prompts or self._default_prompts
        await self._slack.greet_assistant_thread(thread.channel, thread.thread_ts, GREETING, prompts)
        log.info("greeted a new assistant thread")

    async def context_changed(self, body: Mapping[str, Any]) -> None:
        """Answer one ``assistant_thread_context_changed`` (already acknowledged)."""
        thread = parse_assistant_thread(body)
        if thread is not None:
            await self._remember_viewing(thread)

    async def _remember_viewing(self, thread: AssistantThread) -> None:
        if thread.viewing is None:
            return
        key = ThreadKey(thread.team, thread.channel, thread.thread_ts)
        try:
            with redis_errors("remembering the channel viewed"):
                await self._redis.set(self._viewing_key(key), thread.viewing, ex=self._ttl)
        except BotError as exc:
            log.warning("could not remember the channel viewed beside a pane thread: %s", exc)

    async def channel_excerpt(self, key: ThreadKey, question: str) -> ChannelExcerpt | None:
        if not _ABOUT_THE_CHANNEL.search(question):
            return None
        with redis_errors("reading the channel viewed"):
            channel = await self._redis.get(self._viewing_key(key))
        if not channel:
            return None
        channel = str(channel)
        try:
            messages = await self._slack.channel_messages(key.team, channel, CHANNEL_MESSAGES_READ)
        except SlackError as exc:
            log.info("could not read the channel viewed: %s", exc.error)
            problem = _NOT_READABLE.get(exc.error, "Slack would not let me read <#{c}> just now")
            return ChannelExcerpt(channel, problem=problem.format(c=channel))
        lines = [f"{message.speaker_name or message.speaker_id}: {message.text}" for message in messages]
        kept = newest_that_fit(self._counter, lines, self._max_tokens)
        if not kept:
            return ChannelExcerpt(channel, problem=f"<#{channel}> has no messages I could read")
        span = messages[len(messages) - len(kept) :]
        oldest, newest = _when(span[0].ts), _when(span[-1].ts)
        header = f"[channel <#{channel}>: its last {len(kept)} messages, {oldest} to {newest} UTC]"
        text = "\n".join([header, *kept])
        return ChannelExcerpt(channel, text, len(kept), oldest, newest)


def _when(ts: str) -> str:
    return datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M")
