"""``slack-gpt-bot chat``: a conversation in the terminal through the same pipeline as Slack.

It opens the same services as the bot (so the history cap, personas, usage and budgets apply alike) and
runs the pipeline directly, without the job queue. History lives in Redis under the workspace id
``local`` (one thread per session), trimmed the same way;
the persona is the one named with ``--persona``, else the one of ``--channel``, else the default; the
answer streams to the terminal and each is followed by its usage. It needs no Slack tokens, which makes
it the way to try a persona before installing the app.
"""

from __future__ import annotations

import asyncio
import getpass
import itertools
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TextIO

from bot.domain import (
    ChatMessage,
    ChatModel,
    Incoming,
    Job,
    Persona,
    ReplyLog,
    SlackMessage,
    StreamEnd,
    ThreadKey,
)
from bot.services import open_services
from bot.settings import Settings
from bot.usage import micro_usd

LOCAL_TEAM = "local"
PROMPT = "you> "


class TerminalReply:
    """A reply written to the terminal as it streams (implements ``domain.ReplyStream``)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    async def thinking(self) -> None:
        self._out.write("bot> ")
        self._out.flush()

    async def append(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    async def finish(self, footnote: str | None = None) -> None:
        self._out.write(f"\n{footnote}\n" if footnote else "\n")
        self._out.flush()

    async def fail(self, message: str) -> None:
        await self.finish(f"[!] {message}")

    async def notice(self, text: str) -> None:
        self._out.write(f"bot> {text}\n")
        self._out.flush()


class TerminalPort:
    """Implements ``domain.SlackPort`` for the terminal: plain text in, plain text out."""

    def __init__(self, out: TextIO, name: str) -> None:
        self._out = out
        self._name = name

    async def readable(self, team: str, text: str) -> str:
        return text

    async def display_name(self, team: str, user_id: str) -> str:
        return self._name

    async def thread_messages(self, key: ThreadKey) -> list[SlackMessage]:
        return []

    def reply_stream(self, incoming: Incoming, log: ReplyLog) -> TerminalReply:
        return TerminalReply(self._out)


class Metered:
    """A ``ChatModel`` that remembers how its last answer ended, for the usage line."""

    def __init__(self, model: ChatModel) -> None:
        self._model = model
        self.last: StreamEnd | None = None

    def model_for(self, persona: Persona) -> str:
        return self._model.model_for(persona)

    async def stream(
        self, messages: Sequence[ChatMessage], persona: Persona, end_user: str = ""
    ) -> AsyncIterator[str | StreamEnd]:
        self.last = None
        async for piece in self._model.stream(messages, persona, end_user):
            if isinstance(piece, StreamEnd):
                self.last = piece
            yield piece


async def chat(
    settings: Settings, *, persona: str | None, channel: str | None, out: TextIO = sys.stdout
) -> int:
    """Run a terminal conversation until end of input or ``/exit``."""
    async with open_services(settings, slack=False) as services:
        model = Metered(services.model)
        user = getpass.getuser()
        responder = services.responder(TerminalPort(out, user), model)
        session = f"{time.time():.6f}"
        key = ThreadKey(LOCAL_TEAM, channel or "terminal", session)
        personas = services.personas
        if persona and await personas.find(LOCAL_TEAM, persona) is None:
            out.write(f"There is no persona named {persona!r}; using the default.\n")
        chosen = await personas.resolve(key, persona)  # pins the session's persona
        out.write(
            f"Chatting as {user} with persona {chosen.name!r} ({model.model_for(chosen)}). /exit to leave.\n"
        )
        out.flush()
        numbers = itertools.count(1)
        while True:
            try:
                line = await asyncio.to_thread(input, PROMPT)
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            n = next(numbers)
            ts = session if n == 1 else f"{session}{n:06d}"
            incoming = Incoming(key, ts, user, line, addressed=True, is_dm=True)
            await responder.respond(Job(f"local-{n}", incoming))
            if model.last is not None and model.last.usage is not None:
                used = model.last.usage
                prices = services.usage.prices
                cost = micro_usd(prices, model.last.model, used.prompt_tokens, used.completion_tokens) / 1e6
                tokens = f"{used.prompt_tokens} prompt + {used.completion_tokens} completion tokens"
                out.write(f"[{tokens}, about ${cost:.4f}]\n")
                out.flush()
    return 0
