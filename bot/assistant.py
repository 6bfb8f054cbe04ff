"""Slack's assistant pane (Agents & AI Apps): what the bot says when someone opens a thread with it.

A thread in the pane is a thread of the person's DM with the bot, so its questions take the same path as
any DM (the job queue, the DM persona, history, budgets, files, streaming); the first question titles
the thread, and the status line shows while the model works (``slack.SlackReplyStream.thinking``). This
module answers ``assistant_thread_started``: a short greeting and up to four suggested prompts, the
persona's (``suggested_prompts``), else the settings', else the bot's own.

Bolt's ``Assistant`` middleware is not used: it would take the pane's messages into its own listeners,
and every question must be queued by the ingress before Slack is acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from bot.errors import BotError
from bot.personas import PersonaStore
from bot.slack import SlackAdapter, parse_assistant_thread

log = logging.getLogger(__name__)

GREETING = "Hi! Ask me anything, or share a file. I remember everything said in this thread."
DEFAULT_PROMPTS = (
    "Summarize a long text for me",
    "Help me write a clear reply",
    "Explain an error message",
    "Brainstorm ideas with me",
)


class AssistantPane:
    """Greets a new thread in the assistant pane with the prompts of the persona in force there."""

    def __init__(
        self, slack: SlackAdapter, personas: PersonaStore, default_prompts: Sequence[str] | None
    ) -> None:
        self._slack = slack
        self._personas = personas
        self._default_prompts = tuple(default_prompts or DEFAULT_PROMPTS)

    async def thread_started(self, body: Mapping[str, Any]) -> None:
        """Answer one ``assistant_thread_started`` (already acknowledged)."""
        thread = parse_assistant_thread(body)
        if thread is None:
            return
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
